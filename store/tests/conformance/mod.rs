//! The state store's conformance suite: what every implementation of [`StateStore`]
//! must do (a test helper, not part of the library).

use hearth_store::{StateStore, StoreError, Versioned};

/// The suite every store implementation must pass (it panics on the first failure);
/// `store/tests/store.rs` runs it against the embedded store and a real etcd.
pub async fn conformance(store: &dyn StateStore) {
    assert_eq!(store.get("a/1").await.ok().flatten(), None);
    let mut watch = store.watch();
    let r1 = store.put("a/1", b"one".to_vec()).await.expect("put");
    let got = store.get("a/1").await.expect("get").expect("present");
    assert_eq!(
        got,
        Versioned {
            value: b"one".to_vec(),
            revision: r1
        }
    );
    let ev = watch.recv().await.expect("watch event");
    assert_eq!(
        (ev.key.as_str(), ev.value.as_deref(), ev.revision),
        ("a/1", Some(&b"one"[..]), r1)
    );

    // Create-only CAS refuses an existing key; CAS with a stale revision refuses too.
    assert!(matches!(
        store.compare_and_swap("a/1", None, b"x".to_vec()).await,
        Err(StoreError::Conflict { .. })
    ));
    let r2 = store
        .compare_and_swap("a/1", Some(r1), b"two".to_vec())
        .await
        .expect("cas");
    assert!(r2 > r1, "revisions grow");
    assert!(matches!(
        store.compare_and_swap("a/1", Some(r1), b"three".to_vec()).await,
        Err(StoreError::Conflict { .. })
    ));
    let v1 = store.prefix_version("a/").await.expect("prefix version");
    assert_eq!(
        store.prefix_version("a/").await.expect("prefix version"),
        v1,
        "stable without writes"
    );
    let r3 = store
        .compare_and_swap("a/2", None, b"new".to_vec())
        .await
        .expect("create");
    let v2 = store.prefix_version("a/").await.expect("prefix version");
    assert_ne!(v2, v1, "a create under the prefix changes its version");
    store.put("b/1", b"other".to_vec()).await.expect("put");

    let listed: Vec<_> = store
        .list("a/")
        .await
        .expect("list")
        .into_iter()
        .map(|(k, v)| (k, v.value, v.revision))
        .collect();
    assert_eq!(
        listed,
        vec![
            ("a/1".to_string(), b"two".to_vec(), r2),
            ("a/2".to_string(), b"new".to_vec(), r3)
        ]
    );

    assert!(store.delete("a/1").await.expect("delete"));
    assert!(
        !store.delete("a/1").await.expect("delete missing"),
        "deleting a missing key succeeds and says so"
    );
    assert_eq!(store.get("a/1").await.expect("get"), None);
    assert_eq!(store.list("a/").await.expect("list").len(), 1);
    let v3 = store.prefix_version("a/").await.expect("prefix version");
    assert!(v3 != v2 && v3 != v1, "a delete under the prefix changes its version");
    store.put("a/2", b"newer".to_vec()).await.expect("put");
    assert_ne!(
        store.prefix_version("a/").await.expect("prefix version"),
        v3,
        "an overwrite changes it"
    );

    // A relaxed put is a put: seen at once, with a larger revision, by a watcher too.
    let mut watch = store.watch();
    let r4 = store
        .put_relaxed("a/3", b"progress".to_vec())
        .await
        .expect("put_relaxed");
    let got = store.get("a/3").await.expect("get").expect("present");
    assert_eq!(
        got,
        Versioned {
            value: b"progress".to_vec(),
            revision: r4
        }
    );
    let ev = loop {
        let ev = watch.recv().await.expect("watch event");
        if ev.key == "a/3" {
            break ev;
        }
    };
    assert_eq!((ev.value.as_deref(), ev.revision), (Some(&b"progress"[..]), r4));

    // A relaxed write and the writes after it: listed with the rest, overwritten,
    // compared and swapped, deleted, each seen at once.
    let v4 = store.prefix_version("a/").await.expect("prefix version");
    let r5 = store.put_relaxed("a/4", b"step 1".to_vec()).await.expect("put_relaxed");
    assert!(r5 > r4);
    assert_ne!(store.prefix_version("a/").await.expect("prefix version"), v4);
    let keys: Vec<String> = store
        .list("a/")
        .await
        .expect("list")
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(keys, ["a/2", "a/3", "a/4"]);
    let r6 = store.put_relaxed("a/4", b"step 2".to_vec()).await.expect("put_relaxed");
    assert!(matches!(
        store.compare_and_swap("a/4", Some(r5), b"stale".to_vec()).await,
        Err(StoreError::Conflict { .. })
    ));
    let r7 = store
        .compare_and_swap("a/4", Some(r6), b"settled".to_vec())
        .await
        .expect("cas over a relaxed write");
    assert_eq!(
        store.get("a/4").await.expect("get"),
        Some(Versioned {
            value: b"settled".to_vec(),
            revision: r7
        })
    );
    let r8 = store.put_relaxed("a/4", b"again".to_vec()).await.expect("put_relaxed");
    let r9 = store.put("a/4", b"plain".to_vec()).await.expect("put");
    assert!(r9 > r8);
    assert_eq!(
        store.get("a/4").await.expect("get").map(|v| v.value),
        Some(b"plain".to_vec())
    );
    store.put_relaxed("a/4", b"last".to_vec()).await.expect("put_relaxed");
    assert!(store.delete("a/4").await.expect("delete"), "a relaxed key deletes");
    assert!(!store.delete("a/4").await.expect("delete"), "and is gone");
    assert_eq!(store.get("a/4").await.expect("get"), None);
    assert!(!store.list("a/").await.expect("list").iter().any(|(k, _)| k == "a/4"));
    assert!(matches!(
        store.compare_and_swap("a/4", None, b"fresh".to_vec()).await,
        Ok(r) if r > r9
    ));

    // Concurrent create-only CAS: exactly one wins.
    let results = futures_util::future::join_all((0..16).map(|i| store.compare_and_swap("race", None, vec![i]))).await;
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 1);
}

/// Leases: what a host's liveness and the leader's term are made of. A leased key
/// lives while its lease is renewed, is deleted (and watchers told) within a moment of
/// the lease lapsing, and `create_only` lets one holder in at a time.
pub async fn leases(store: &dyn StateStore) {
    use std::time::{Duration, Instant};
    let ttl = Duration::from_secs(2);
    let lease = store.grant_lease(ttl).await.expect("grant");
    let rival = store.grant_lease(ttl).await.expect("grant");
    let mut watch = store.watch();
    let r = store
        .put_leased("leader", b"one".to_vec(), lease, true)
        .await
        .expect("put leased");
    assert!(r.is_some(), "the first holder gets the key");
    assert_eq!(
        store
            .put_leased("leader", b"two".to_vec(), rival, true)
            .await
            .expect("put"),
        None,
        "create_only: a second holder does not"
    );
    assert_eq!(store.get("leader").await.expect("get").expect("held").value, b"one");
    // Renewed past its TTL, it stays.
    let until = Instant::now() + ttl + Duration::from_millis(1500);
    while Instant::now() < until {
        assert!(store.keep_alive(lease).await.expect("keep alive"), "renewed in time");
        assert!(store.keep_alive(rival).await.expect("keep alive"));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        store.get("leader").await.expect("get").is_some(),
        "a renewed lease keeps its key"
    );
    // Left alone, it lapses: the key is deleted and watchers see the delete.
    let left = Instant::now();
    let deadline = left + ttl + Duration::from_secs(3);
    let mut renew = tokio::time::interval(Duration::from_millis(500));
    loop {
        let ev = tokio::select! {
            _ = renew.tick() => {
                assert!(store.keep_alive(rival).await.expect("keep alive"));
                continue;
            }
            ev = tokio::time::timeout_at(deadline.into(), watch.recv()) => ev,
        };
        let ev = ev.expect("the lapsed lease's key is deleted in time").expect("watch");
        if ev.key == "leader" && ev.value.is_none() {
            break;
        }
    }
    assert!(left.elapsed() >= Duration::from_millis(1500), "not before its TTL");
    assert_eq!(store.get("leader").await.expect("get"), None);
    assert!(
        !store.keep_alive(lease).await.expect("keep alive"),
        "a lapsed lease stays lapsed"
    );
    assert!(matches!(
        store.put_leased("x", vec![], lease, false).await,
        Err(StoreError::LeaseLapsed(_))
    ));
    // Now the rival can take it; revoking its lease deletes the key at once.
    assert!(store
        .put_leased("leader", b"two".to_vec(), rival, true)
        .await
        .expect("put")
        .is_some());
    store
        .put_leased("alive/a", b"a".to_vec(), rival, false)
        .await
        .expect("put");
    store.revoke_lease(rival).await.expect("revoke");
    assert_eq!(store.get("leader").await.expect("get"), None);
    assert_eq!(store.get("alive/a").await.expect("get"), None);
    store.revoke_lease(rival).await.expect("revoking twice is no error");
}
