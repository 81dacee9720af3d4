/* A PVH guest for the real Cloud Hypervisor on machines whose KVM cannot run Linux:
 * it prints "HEARTH-COUNT n" on COM1 about five times a second, counting from 1, and
 * sleeps in between (hlt, woken by the local APIC timer), so it costs no host CPU.
 * The count lives in guest memory: a VM restored from a snapshot with memory goes on
 * from the snapshot's count, a rebooted VM starts again from 1.  It ignores the power
 * button (no ACPI): stop it with a forced stop.
 * Build: guest-images/pvh-count/build.sh (needs binutils). */
        .section .note.Xen, "a"
        .align 4
        .long 4            /* namesz */
        .long 4            /* descsz */
        .long 18           /* XEN_ELFNOTE_PHYS32_ENTRY */
        .asciz "Xen"
        .long _start

        .set LAPIC, 0xfee00000
        .set COM1, 0x3f8
        .set VECTOR, 0x40

        .text
        .code32
        .globl _start
_start:
        cli
        mov $stack_top, %esp
        movl $0, count              /* a reboot starts from 1 again */
        /* An IDT whose every gate points at tick (32-bit interrupt gates, selector =
         * the flat code segment PVH entered with). */
        mov %cs, %ax
        shl $16, %eax
        mov $tick, %ebx
        mov %bx, %ax                /* low half: selector:offset[15:0] */
        mov $tick, %edx
        and $0xffff0000, %edx
        or $0x8e00, %edx            /* present, ring 0, 32-bit interrupt gate */
        mov $idt, %edi
        mov $256, %ecx
1:      mov %eax, (%edi)
        mov %edx, 4(%edi)
        add $8, %edi
        loop 1b
        lidt idt_ptr

        mov $hello, %esi
        call puts

        /* Local APIC: software-enabled, periodic timer on VECTOR. */
        movl $0x1ff, LAPIC + 0xf0   /* spurious vector 0xff, APIC enabled */
        movl $0xb, LAPIC + 0x3e0    /* divide by 1 */
        movl $(0x20000 | VECTOR), LAPIC + 0x320  /* periodic */
        movl $200000000, LAPIC + 0x380          /* ~0.2 s at KVM's 1 GHz APIC clock */
idle:
        sti
        hlt
        jmp idle

/* The timer interrupt.  It never returns with iret (this nested KVM fails to emulate
 * it): the interrupted code is only the idle loop, so it starts that loop afresh. */
tick:
        mov $stack_top, %esp
        incl count
        mov $prefix, %esi
        call puts
        mov count, %eax
        call putdec
        mov $'\n', %al
        call putc
        movl $0, LAPIC + 0xb0       /* end of interrupt */
        jmp idle

/* putc: %al to COM1 */
putc:
        push %edx
        mov $COM1, %dx
        outb %al, %dx
        pop %edx
        ret

/* puts: the NUL-terminated string at %esi */
puts:
        push %eax
3:      lodsb
        test %al, %al
        jz 4f
        call putc
        jmp 3b
4:      pop %eax
        ret

/* putdec: %eax in decimal */
putdec:
        mov $digits_end, %edi
        mov $10, %ecx
5:      xor %edx, %edx
        div %ecx
        add $'0', %dl
        dec %edi
        mov %dl, (%edi)
        test %eax, %eax
        jnz 5b
6:      cmp $digits_end, %edi
        je 7f
        mov (%edi), %al
        call putc
        inc %edi
        jmp 6b
7:      ret

hello:  .asciz "HEARTH-GUEST-READY (PVH counter)\n"
prefix: .asciz "HEARTH-COUNT "

        .data
        .align 8
idt_ptr:
        .word 256 * 8 - 1
        .long idt

        .bss
        .align 16
count:  .long 0
digits: .skip 12
digits_end:
        .align 16
idt:    .skip 256 * 8
stack:  .skip 4096
stack_top:
