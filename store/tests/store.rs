//! The state store's shared suite against both implementations: the embedded redb file
//! and a real etcd started here. Then what an etcd outage looks like to the store: a
//! clear "unavailable" within seconds, and everything (writes, the watch) back once etcd
//! returns.

mod conformance;

use std::time::{Duration, Instant};

use hearth_store::etcd::{EtcdStore, EtcdTarget};
use hearth_store::{self as store, StateStore, StoreError, StoreLocation};
use testkit::etcd::{free_port, Etcd};

#[tokio::test]
async fn embedded_store_passes_the_suite() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = store::open(&StoreLocation::Embedded, dir.path()).await.expect("open");
    conformance::conformance(s.as_ref()).await;
    conformance::leases(s.as_ref()).await;
    assert!(dir.path().join("store.redb").exists());
}

/// A leased key does not outlive the process that renewed its lease: opened again,
/// the embedded store no longer has it, and it keeps its other keys.
#[tokio::test]
async fn leased_keys_go_with_the_process_that_held_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let s = store::open(&StoreLocation::Embedded, dir.path()).await.expect("open");
        let lease = s.grant_lease(Duration::from_secs(60)).await.expect("grant");
        s.put_leased("alive/h1", b"x".to_vec(), lease, false)
            .await
            .expect("put");
        s.put("hosts/h1", b"y".to_vec()).await.expect("put");
    }
    let s = store::open(&StoreLocation::Embedded, dir.path()).await.expect("reopen");
    assert_eq!(s.get("alive/h1").await.expect("get"), None);
    assert_eq!(s.get("hosts/h1").await.expect("get").expect("kept").value, b"y");
}

/// What the embedded store's journal of relaxed writes holds comes back after a
/// restart, each key at its last change (relaxed or not), with revisions that keep
/// growing; then the journal starts empty.
#[tokio::test]
async fn relaxed_writes_survive_a_restart_of_the_process() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (last, kept, overwritten, deleted);
    {
        let s = store::open(&StoreLocation::Embedded, dir.path()).await.expect("open");
        s.put("sagas/overwritten", b"old".to_vec()).await.expect("put");
        s.put_relaxed("sagas/overwritten", b"relaxed".to_vec())
            .await
            .expect("put_relaxed");
        kept = s
            .put_relaxed("sagas/kept", b"step 3".to_vec())
            .await
            .expect("put_relaxed");
        s.put_relaxed("sagas/deleted", b"x".to_vec())
            .await
            .expect("put_relaxed");
        deleted = s.delete("sagas/deleted").await.expect("delete");
        s.put_relaxed("sagas/settled", b"relaxed".to_vec())
            .await
            .expect("put_relaxed");
        overwritten = s.put("sagas/settled", b"durable".to_vec()).await.expect("put");
        last = s.put_relaxed("vms/1", b"v".to_vec()).await.expect("put_relaxed");
        assert!(
            std::fs::metadata(dir.path().join("store.journal"))
                .expect("journal")
                .len()
                > 0,
            "relaxed writes went to the journal"
        );
        // Dropped without any goodbye, as a killed process would be.
    }
    assert!(deleted);
    let s = store::open(&StoreLocation::Embedded, dir.path()).await.expect("reopen");
    let get = |k: &'static str| {
        let s = &s;
        async move { s.get(k).await.expect("get") }
    };
    assert_eq!(
        get("sagas/kept").await.map(|v| (v.value, v.revision)),
        Some((b"step 3".to_vec(), kept))
    );
    assert_eq!(
        get("sagas/overwritten").await.map(|v| v.value),
        Some(b"relaxed".to_vec())
    );
    assert_eq!(get("sagas/deleted").await, None);
    assert_eq!(
        get("sagas/settled").await.map(|v| (v.value, v.revision)),
        Some((b"durable".to_vec(), overwritten)),
        "a durable write after a relaxed one wins"
    );
    assert_eq!(get("vms/1").await.map(|v| v.revision), Some(last));
    assert!(s.put("x", vec![]).await.expect("put") > last, "revisions keep growing");
    assert_eq!(
        std::fs::metadata(dir.path().join("store.journal"))
            .expect("journal")
            .len(),
        0,
        "the journal was folded into the file"
    );
}

#[tokio::test]
async fn etcd_store_passes_the_suite_and_survives_an_outage() {
    let mut etcd = Etcd::start(free_port(), free_port());
    let location: StoreLocation = etcd.store_url().parse().expect("store url");
    let dir = tempfile::tempdir().expect("tempdir");
    let s = store::open(&location, dir.path()).await.expect("connect");
    conformance::conformance(s.as_ref()).await;
    conformance::leases(s.as_ref()).await;

    // Two prefixes in one etcd are two stores that do not see each other.
    let other = EtcdStore::connect(
        &format!("{}/other", etcd.store_url())
            .parse::<EtcdTarget>()
            .expect("url"),
    )
    .await
    .expect("connect");
    assert!(
        other.list("").await.expect("list").is_empty(),
        "the other prefix is empty"
    );
    other.put("a/2", b"mine".to_vec()).await.expect("put");
    let ours = s.get("a/2").await.expect("get").expect("a/2 from the suite");
    assert_eq!(ours.value, b"newer", "a write under another prefix leaves ours alone");

    let before = s.put("outage/before", b"1".to_vec()).await.expect("put");
    let mut watch = s.watch();
    etcd.kill();
    let t = Instant::now();
    let err = s.put("outage/during", b"2".to_vec()).await.expect_err("etcd is down");
    let waited = t.elapsed();
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    let message = err.to_string();
    assert!(message.contains("etcd at http://127.0.0.1:"), "{message}");
    assert!(waited < Duration::from_secs(10), "failing took {waited:?}");
    eprintln!("a write with etcd down failed after {waited:?}: {message}");
    let api: socket_http::ApiError = err.into();
    assert_eq!(api.status.as_u16(), 503);

    etcd.restart();
    let deadline = Instant::now() + Duration::from_secs(20);
    let after = loop {
        match s.put("outage/after", b"3".to_vec()).await {
            Ok(r) => break r,
            Err(e) => {
                assert!(Instant::now() < deadline, "etcd is back but writes still fail: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    assert!(after > before);
    assert_eq!(
        s.get("outage/before").await.expect("get").map(|v| v.value),
        Some(b"1".to_vec())
    );
    assert_eq!(
        s.get("outage/during").await.expect("get"),
        None,
        "the failed write did not land"
    );
    // The watch resumed after the outage and reports the write made after it.
    let ev = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            let ev = watch.recv().await.expect("watch open");
            if ev.key == "outage/after" {
                return ev;
            }
        }
    })
    .await
    .expect("the watch saw the write after etcd came back");
    assert_eq!((ev.value.as_deref(), ev.revision), (Some(&b"3"[..]), after));
}

/// A journal past its size limit is rewritten to its live entries: it shrinks, and
/// what it held (the newest value of a key written over and over) survives a restart.
/// Watchers see every change in revision order, relaxed and durable writes mixed.
#[tokio::test]
async fn the_journal_is_compacted_and_changes_reach_watchers_in_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let journal = dir.path().join("store.journal");
    let last = {
        let s =
            std::sync::Arc::new(store::embedded::EmbeddedStore::open(&dir.path().join("store.redb")).expect("open"));
        let mut watch = s.watch();
        let mut last = 0;
        for i in 0..10u8 {
            last = s.put_relaxed("sagas/big", vec![i; 1 << 20]).await.expect("put_relaxed");
        }
        let size = std::fs::metadata(&journal).expect("journal").len();
        assert!(size < 4 << 20, "the journal was compacted: {size} bytes");
        let writes = (0..40).map(|i| {
            let s = s.clone();
            tokio::spawn(async move {
                if i % 2 == 0 {
                    s.put_relaxed(&format!("sagas/{i}"), vec![1]).await
                } else {
                    s.put(&format!("vms/{i}"), vec![1]).await
                }
            })
        });
        for w in futures_util::future::join_all(writes).await {
            w.expect("join").expect("write");
        }
        let mut seen = Vec::new();
        while let Ok(ev) = watch.try_recv() {
            seen.push(ev.revision);
        }
        assert_eq!(seen.len(), 50, "every change was announced");
        assert!(seen.windows(2).all(|w| w[0] < w[1]), "in revision order: {seen:?}");
        last
    };
    let s = store::embedded::EmbeddedStore::open(&dir.path().join("store.redb")).expect("reopen");
    let got = s.get("sagas/big").await.expect("get").expect("present");
    assert_eq!((got.value.len(), got.value[0], got.revision), (1 << 20, 9, last));
}
