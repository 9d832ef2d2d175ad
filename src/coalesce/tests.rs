//! The coalescer's tests: modes, refusals and the safety rules, against real futures.

use super::*;

fn settings(mode: CoalesceMode) -> CoalesceConfig {
    CoalesceConfig {
        mode,
        ..CoalesceConfig::default()
    }
}

fn fingerprint(body: &'static [u8]) -> Option<Box<Fingerprint>> {
    Some(Box::new(Fingerprint {
        method: Method::PUT,
        uri: Uri::from_static("/k"),
        content_type: None,
        body: Bytes::from_static(body),
    }))
}

fn ok_job() -> Job {
    Box::pin(async { ok_reply() })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distinct_keys_leave_nothing_behind() {
    let coalescer = Coalescer::new("t");
    let s = settings(CoalesceMode::Serialize);
    let mut tasks = Vec::new();
    for chunk in 0..8u32 {
        let (coalescer, s) = (Arc::clone(&coalescer), s.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0..25_000u32 {
                let key = Bytes::from(format!("{chunk}-{i}"));
                let (reply, how) = coalescer
                    .write(key, fingerprint(b"v"), ok_job(), &s)
                    .await
                    .unwrap();
                assert_eq!((reply.status, how), (StatusCode::OK, Disposition::Sent));
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(
        coalescer.active_keys(),
        0,
        "200,000 keys passed through and left no state"
    );
    for shard in coalescer.shards.iter() {
        assert!(shard.lock().unwrap().is_empty());
    }
}

#[tokio::test]
async fn a_full_queue_refuses_with_retry_after_and_keeps_no_state() {
    let coalescer = Coalescer::new("t");
    let s = CoalesceConfig {
        max_pending_per_key: 1,
        ..settings(CoalesceMode::Serialize)
    };
    let (release, released) = oneshot::channel::<()>();
    let held: Job = Box::pin(async move {
        let _ = released.await;
        ok_reply()
    });
    let key = Bytes::from_static(b"k");
    let first = tokio::spawn({
        let (c, s, key) = (Arc::clone(&coalescer), s.clone(), key.clone());
        async move { c.write(key, fingerprint(b"1"), held, &s).await }
    });
    let second = tokio::spawn({
        let (c, s, key) = (Arc::clone(&coalescer), s.clone(), key.clone());
        async move { c.write(key, fingerprint(b"2"), ok_job(), &s).await }
    });
    while coalescer.waiting(&key) < 1 {
        tokio::task::yield_now().await;
    }
    let third = coalescer
        .write(key.clone(), fingerprint(b"3"), ok_job(), &s)
        .await;
    assert!(
        matches!(third, Err(Refusal::QueueFull { retry_after }) if retry_after >= Duration::from_secs(1))
    );
    release.send(()).unwrap();
    assert!(first.await.unwrap().is_ok());
    assert!(second.await.unwrap().is_ok());
    assert_eq!(coalescer.active_keys(), 0);
}

#[tokio::test]
async fn a_job_that_panics_frees_its_key() {
    let coalescer = Coalescer::new("t");
    let s = settings(CoalesceMode::Serialize);
    let key = Bytes::from_static(b"k");
    let boom = || -> Job { Box::pin(async { panic!("injected failure") }) };
    let spawn_write = |body: &'static [u8], job: Job| {
        let (c, s, key) = (Arc::clone(&coalescer), s.clone(), key.clone());
        tokio::spawn(async move { c.write(key, fingerprint(body), job, &s).await })
    };
    // On a free key the write runs on its client's task: the panic is that task's.
    assert!(spawn_write(b"1", boom()).await.is_err());
    let (reply, _) = coalescer
        .write(key.clone(), fingerprint(b"2"), ok_job(), &s)
        .await
        .unwrap();
    assert_eq!(reply.status, StatusCode::OK, "the key was freed");
    // Behind a held write, a panicking job runs on the queue's task: its client gets 500.
    let (release, released) = oneshot::channel::<()>();
    let held: Job = Box::pin(async move {
        let _ = released.await;
        ok_reply()
    });
    let holder = spawn_write(b"3", held);
    while coalescer.active_keys() == 0 {
        tokio::task::yield_now().await;
    }
    let queued = spawn_write(b"4", boom());
    while coalescer.waiting(&key) == 0 {
        tokio::task::yield_now().await;
    }
    release.send(()).unwrap();
    assert!(holder.await.unwrap().is_ok());
    let (reply, _) = queued.await.unwrap().unwrap();
    assert_eq!(reply.status, StatusCode::INTERNAL_SERVER_ERROR);
    let (reply, _) = coalescer
        .write(key, fingerprint(b"5"), ok_job(), &s)
        .await
        .unwrap();
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(coalescer.active_keys(), 0);
}

fn ok_reply() -> SharedResponse {
    SharedResponse {
        origin: Origin::Backend,
        status: StatusCode::OK,
        headers: HeaderMap::new(),
        backend_lines: None,
        body: Bytes::new(),
        backend: None,
    }
}
