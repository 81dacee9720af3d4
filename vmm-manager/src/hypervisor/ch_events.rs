//! Cloud Hypervisor's `--event-monitor` output: pretty-printed JSON values separated by
//! blank lines, so it is parsed as a stream of JSON values, never line by line. The
//! file may end in the middle of a value while the VMM is writing it.

use serde::Deserialize;

/// One event.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ChEvent {
    pub timestamp: ChTimestamp,
    pub source: String,
    pub event: String,
    #[serde(default)]
    pub properties: Option<std::collections::BTreeMap<String, String>>,
}

/// Time since the VMM started.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
pub struct ChTimestamp {
    pub secs: u64,
    pub nanos: u32,
}

/// Incremental parser: feed it bytes as they arrive, get complete events back.
#[derive(Debug, Default)]
pub struct EventStream {
    pending: Vec<u8>,
}

impl EventStream {
    /// Appends `bytes` and returns every event now complete. Values that are not events
    /// are skipped; garbage is dropped up to the next value so one bad write cannot wedge
    /// the stream.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<ChEvent> {
        self.pending.extend_from_slice(bytes);
        let mut out = Vec::new();
        let mut consumed = 0;
        let mut iter = serde_json::Deserializer::from_slice(&self.pending).into_iter::<serde_json::Value>();
        loop {
            match iter.next() {
                Some(Ok(v)) => {
                    consumed = iter.byte_offset();
                    if let Ok(ev) = serde_json::from_value::<ChEvent>(v) {
                        out.push(ev);
                    }
                }
                Some(Err(e)) if e.is_eof() => break,
                Some(Err(_)) => {
                    // Skip to the next '{' after the current position.
                    let from = consumed + 1;
                    consumed = self.pending[from.min(self.pending.len())..]
                        .iter()
                        .position(|&b| b == b'{')
                        .map(|p| from + p)
                        .unwrap_or(self.pending.len());
                    self.pending.drain(..consumed);
                    let mut rest = self.push(&[]);
                    out.append(&mut rest);
                    return out;
                }
                None => break,
            }
        }
        self.pending.drain(..consumed);
        out
    }
}

/// What an event says about the VM's state, for a change made outside hearth (through
/// the VMM's own API, `ch-remote`, or by the guest): `paused` and `resumed` change it;
/// `rebooted` keeps it running and is reported with its reason.
pub fn state_change(ev: &ChEvent) -> Option<(crate::spec::VmState, &'static str)> {
    use crate::spec::VmState;
    match (ev.source.as_str(), ev.event.as_str()) {
        ("vm", "paused") => Some((VmState::Paused, "paused through Cloud Hypervisor's own API")),
        ("vm", "resumed") => Some((VmState::Running, "resumed through Cloud Hypervisor's own API")),
        ("vm", "rebooted") => Some((VmState::Running, "the VM rebooted")),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TWO: &str = "{\n  \"timestamp\": {\n    \"secs\": 0,\n    \"nanos\": 2592440\n  },\n  \"source\": \"vmm\",\n  \"event\": \"starting\",\n  \"properties\": null\n}\n\n{\n  \"timestamp\": {\n    \"secs\": 1,\n    \"nanos\": 5\n  },\n  \"source\": \"vm\",\n  \"event\": \"booted\",\n  \"properties\": {\"id\": \"x\"}\n}\n\n";

    #[test]
    fn multi_line_values_split_anywhere_are_reassembled() {
        for split in 0..TWO.len() {
            let mut s = EventStream::default();
            let mut evs = s.push(&TWO.as_bytes()[..split]);
            evs.extend(s.push(&TWO.as_bytes()[split..]));
            let names: Vec<_> = evs.iter().map(|e| format!("{}/{}", e.source, e.event)).collect();
            assert_eq!(names, ["vmm/starting", "vm/booted"], "split at {split}");
            assert_eq!(
                evs[1].properties.as_ref().and_then(|p| p.get("id")).map(String::as_str),
                Some("x")
            );
        }
    }

    #[test]
    fn pause_resume_and_reboot_are_state_changes() {
        use crate::spec::VmState;
        let ev = |source: &str, event: &str| ChEvent {
            timestamp: ChTimestamp { secs: 0, nanos: 0 },
            source: source.into(),
            event: event.into(),
            properties: None,
        };
        assert_eq!(state_change(&ev("vm", "paused")).map(|c| c.0), Some(VmState::Paused));
        assert_eq!(state_change(&ev("vm", "resumed")).map(|c| c.0), Some(VmState::Running));
        assert_eq!(state_change(&ev("vm", "rebooted")).map(|c| c.0), Some(VmState::Running));
        for (source, event) in [
            ("vm", "pausing"),
            ("vm", "booted"),
            ("vmm", "shutdown"),
            ("virtio-device", "activated"),
        ] {
            assert_eq!(state_change(&ev(source, event)), None, "{source}/{event}");
        }
    }

    #[test]
    fn garbage_and_foreign_values_are_skipped() {
        let mut s = EventStream::default();
        let input = format!("[1,2]\n}}}} oops\n{TWO}");
        let evs = s.push(input.as_bytes());
        assert_eq!(evs.len(), 2);
        assert!(s.push(b"").is_empty());
    }
}
