//! The web console in a real browser: Playwright (`web/tests/e2e.mjs`, playwright-core
//! from npm) drives Debian's headless Chromium against hearth-api inside a private network
//! namespace. It signs in, creates a QEMU `tiny` VM with a display, sees
//! HEARTH-GUEST-READY in xterm.js, types `echo $((6*7))` and sees 42, compares the noVNC
//! canvas with QEMU's own screendump (taken through QMP), then stops and deletes the VM.
//! Screenshots are kept in `target/web-e2e/` (or `$HEARTH_E2E_ARTIFACTS`).
//!
//! Needs the web console built (`scripts/build-web.sh`, which also installs
//! playwright-core) and `/usr/bin/chromium`; `scripts/test.sh` arranges both.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::{in_private_netns, Stack};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace")
        .to_path_buf()
}

#[test]
fn browser_signs_in_boots_a_vm_types_in_xterm_and_sees_the_vnc_screen() {
    let web = repo().join("web");
    assert!(
        web.join("node_modules/playwright-core").exists() && hearth_api::web::built(),
        "the web console is not built: run scripts/build-web.sh, then build again"
    );
    let artifacts = std::env::var_os("HEARTH_E2E_ARTIFACTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target/web-e2e"));
    let _ = std::fs::remove_dir_all(&artifacts);
    std::fs::create_dir_all(&artifacts).expect("artifacts dir");
    in_private_netns(move || async move {
        let stack = Stack::start(&[]).await;
        let qmp = stack.data_dir().join("run/vms/{id}/qmp.sock");
        let out = Command::new("node")
            .arg(web.join("tests/e2e.mjs"))
            .env("HEARTH_URL", stack.url())
            .env("HEARTH_API_KEY", &stack.key)
            .env("ARTIFACTS", &artifacts)
            .env("QMP_DIR_TEMPLATE", qmp)
            .current_dir(&web)
            .output()
            .expect("run node (is Node.js installed?)");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        eprintln!("{stdout}{stderr}");
        assert!(
            out.status.success(),
            "the browser test failed ({}); screenshots in {}; api log:\n{}",
            out.status,
            artifacts.display(),
            stack.log()
        );
        // What the browser made is gone: no VM left.
        let (_, vms) = stack.call("GET", "/v1/vms", None).await;
        assert_eq!(vms, serde_json::json!([]), "the browser test left a VM behind");
        assert!(stack.vmm_processes().is_empty(), "a VMM is still running");
    });
}
