//! The embedded store's journal of relaxed writes ([`crate::StateStore::put_relaxed`]
//! and deletes of keys so written): records appended to `store.journal` with one
//! `write` each, never synced. A crash of the process loses none of them (the kernel
//! has the pages); a crash of the host may lose the last ones, which the relaxed
//! contract allows. At open the journal is replayed into the redb file in one durable
//! transaction and emptied.
//!
//! A record: `len: u32 LE | crc32(payload): u32 LE | payload`, the payload
//! `op: u8 (1 put, 2 delete) | revision: u64 LE | key_len: u16 LE | key | value`.
//! Reading stops at the first record that is short or fails its checksum: a torn tail
//! (a host crash mid-append) is cut off.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

/// One change in the journal: a value, or `None` for a delete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    pub key: String,
    pub revision: u64,
    pub value: Option<Vec<u8>>,
}

/// The journal file, open for appending.
pub(crate) struct Journal {
    path: PathBuf,
    file: File,
    bytes: u64,
}

/// Rewritten (to the live entries only) once it holds this much.
const COMPACT_AT: u64 = 8 << 20;

fn encode(e: &Entry) -> Vec<u8> {
    let value = e.value.as_deref().unwrap_or_default();
    let mut payload = Vec::with_capacity(11 + e.key.len() + value.len());
    payload.push(if e.value.is_some() { 1 } else { 2 });
    payload.extend_from_slice(&e.revision.to_le_bytes());
    payload.extend_from_slice(&(e.key.len() as u16).to_le_bytes());
    payload.extend_from_slice(e.key.as_bytes());
    payload.extend_from_slice(value);
    let mut out = Vec::with_capacity(8 + payload.len());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    out
}

fn decode(payload: &[u8]) -> Option<Entry> {
    let (&op, rest) = payload.split_first()?;
    let revision = u64::from_le_bytes(rest.get(..8)?.try_into().ok()?);
    let key_len = u16::from_le_bytes(rest.get(8..10)?.try_into().ok()?) as usize;
    let key = std::str::from_utf8(rest.get(10..10 + key_len)?).ok()?.to_string();
    let value = rest.get(10 + key_len..)?.to_vec();
    match op {
        1 => Some(Entry {
            key,
            revision,
            value: Some(value),
        }),
        2 if value.is_empty() => Some(Entry {
            key,
            revision,
            value: None,
        }),
        _ => None,
    }
}

/// The whole records of `bytes`, and how many bytes they take.
fn parse(bytes: &[u8]) -> (Vec<Entry>, usize) {
    let mut entries = Vec::new();
    let mut at = 0;
    while let Some(head) = bytes.get(at..at + 8) {
        let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
        let crc = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
        let Some(payload) = bytes.get(at + 8..at + 8 + len) else {
            break;
        };
        if crc32fast::hash(payload) != crc {
            break;
        }
        let Some(e) = decode(payload) else {
            break;
        };
        entries.push(e);
        at += 8 + len;
    }
    (entries, at)
}

impl Journal {
    /// Opens (or creates) the journal at `path` and returns what it holds, each key's
    /// last change; a torn tail is cut off.
    pub fn open(path: &Path) -> io::Result<(Journal, BTreeMap<String, Entry>)> {
        let mut file = OpenOptions::new().read(true).append(true).create(true).open(path)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        let (entries, whole) = parse(&bytes);
        if whole < bytes.len() {
            tracing::warn!(
                path = %path.display(),
                cut = bytes.len() - whole,
                "the store journal ends in a torn record (the host went down mid-write); it is cut off"
            );
            file.set_len(whole as u64)?;
        }
        let mut last = BTreeMap::new();
        for e in entries {
            last.insert(e.key.clone(), e);
        }
        Ok((
            Journal {
                path: path.to_path_buf(),
                file,
                bytes: whole as u64,
            },
            last,
        ))
    }

    /// Appends one change (one `write`, not synced).
    pub fn append(&mut self, e: &Entry) -> io::Result<()> {
        let record = encode(e);
        self.file.write_all(&record)?;
        self.bytes += record.len() as u64;
        Ok(())
    }

    /// Empties the journal (its changes are in the redb file now).
    pub fn clear(&mut self) -> io::Result<()> {
        self.file.set_len(0)?;
        self.bytes = 0;
        Ok(())
    }

    /// Whether it has grown enough to be rewritten with [`Journal::rewrite`].
    pub fn wants_compaction(&self) -> bool {
        self.bytes >= COMPACT_AT
    }

    /// Replaces the journal by one holding only `live` (written beside it and renamed
    /// over it: a crash leaves the old journal or the new one, each whole).
    pub fn rewrite<'a>(&mut self, live: impl Iterator<Item = &'a Entry>) -> io::Result<()> {
        let tmp = self.path.with_extension("journal.tmp");
        let mut out = Vec::new();
        for e in live {
            out.extend_from_slice(&encode(e));
        }
        std::fs::write(&tmp, &out)?;
        std::fs::rename(&tmp, &self.path)?;
        self.file = OpenOptions::new().append(true).open(&self.path)?;
        self.bytes = out.len() as u64;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(key: &str, revision: u64, value: &[u8]) -> Entry {
        Entry {
            key: key.into(),
            revision,
            value: Some(value.to_vec()),
        }
    }

    #[test]
    fn records_come_back_and_a_torn_tail_is_cut_off() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("store.journal");
        {
            let (mut j, last) = Journal::open(&path).expect("open");
            assert!(last.is_empty());
            j.append(&put("sagas/a", 3, b"one")).expect("append");
            j.append(&put("sagas/b", 4, b"")).expect("append");
            j.append(&put("sagas/a", 5, b"two")).expect("append");
            j.append(&Entry {
                key: "sagas/b".into(),
                revision: 6,
                value: None,
            })
            .expect("append");
        }
        // Half a record more: what a host crash mid-append leaves.
        let whole = std::fs::metadata(&path).expect("meta").len();
        let mut torn = encode(&put("sagas/c", 7, b"lost"));
        torn.truncate(torn.len() - 2);
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .and_then(|mut f| f.write_all(&torn))
            .expect("tear");
        let (mut j, last) = Journal::open(&path).expect("reopen");
        assert_eq!(last.len(), 2);
        assert_eq!(last["sagas/a"], put("sagas/a", 5, b"two"));
        assert_eq!(last["sagas/b"].value, None, "the delete is the key's last change");
        assert!(!last.contains_key("sagas/c"));
        assert_eq!(
            std::fs::metadata(&path).expect("meta").len(),
            whole,
            "cut to whole records"
        );
        // Appends continue after the cut; a rewrite keeps only what it is given.
        j.append(&put("sagas/d", 8, b"four")).expect("append");
        let (_, last) = Journal::open(&path).expect("reopen");
        assert_eq!(last["sagas/d"], put("sagas/d", 8, b"four"));
        let keep = [put("sagas/d", 8, b"four")];
        j.rewrite(keep.iter()).expect("rewrite");
        j.append(&put("sagas/e", 9, b"five")).expect("append");
        let (_, last) = Journal::open(&path).expect("reopen");
        assert_eq!(last.keys().collect::<Vec<_>>(), ["sagas/d", "sagas/e"]);
        // A flipped bit ends the journal there.
        let mut bytes = std::fs::read(&path).expect("read");
        let n = bytes.len();
        bytes[n - 1] ^= 1;
        std::fs::write(&path, &bytes).expect("write");
        let (_, last) = Journal::open(&path).expect("reopen");
        assert_eq!(last.keys().collect::<Vec<_>>(), ["sagas/d"]);
    }
}
