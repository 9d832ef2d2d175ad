//! One contract, three stores: memory, file (redb) and Redis (a real `redis-server` started here)
//! answer claims and endings the same way, and exactly one of many concurrent claimers wins.

mod support;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use support::processes::start_redis;
use writegate::idempotency::store::{self, FileStore, MemoryStore, RedisStore};
use writegate::idempotency::{Claim, Claimed, Ending, Outcome, Record, Store};

const WAIT: Duration = Duration::from_secs(5);

fn claim(token: u8, head: u8) -> Claim {
    Claim {
        token: [token; 16],
        head: [head; 32],
        ttl: Duration::from_secs(60),
        lease: Duration::from_secs(30),
        take_over: false,
    }
}

fn record(head: u8, body: &'static str) -> Arc<Record> {
    Arc::new(Record {
        head: [head; 32],
        body: Some([9; 32]),
        outcome: Outcome::Response {
            status: StatusCode::CREATED,
            headers: HeaderMap::new(),
            body: Bytes::from_static(body.as_bytes()),
        },
    })
}

async fn claim_of(s: &dyn Store, id: u8, c: &Claim) -> Claimed {
    store::claim(s, &[id; 32], c, WAIT)
        .await
        .expect("store answers")
}

async fn end(s: &dyn Store, id: u8, token: u8, ending: Ending) {
    store::finish(s, &[id; 32], &[token; 16], ending, WAIT)
        .await
        .expect("store answers");
}

/// Ends claim `token` of entry `id` by recording `kept` for `ttl`.
async fn keep(s: &dyn Store, id: u8, token: u8, kept: Arc<Record>, ttl: Duration) {
    end(s, id, token, Ending::Record { record: kept, ttl }).await;
}

/// Every rule of the store contract, on ids no other test uses.
async fn contract(shared: Arc<dyn Store>) {
    let s = &*shared;
    // Claimed once; the second claimer sees it in flight, with its head.
    assert!(matches!(claim_of(s, 1, &claim(1, 7)).await, Claimed::Won));
    match claim_of(s, 1, &claim(2, 8)).await {
        Claimed::InFlight { head, lease_left } => {
            assert_eq!(head, [7; 32]);
            assert!(lease_left > Duration::from_secs(20) && lease_left <= Duration::from_secs(30));
        }
        other => panic!("expected in flight, got {other:?}"),
    }
    // Only the claim's own token can end it.
    let ttl = Duration::from_secs(60);
    keep(s, 1, 2, record(7, "forged"), ttl).await;
    assert!(matches!(
        claim_of(s, 1, &claim(3, 7)).await,
        Claimed::InFlight { .. }
    ));
    keep(s, 1, 1, record(7, "first"), ttl).await;
    match claim_of(s, 1, &claim(4, 7)).await {
        Claimed::Done(found) => assert_eq!(found, record(7, "first")),
        other => panic!("expected done, got {other:?}"),
    }
    // A later ending by the same token changes nothing once recorded.
    end(s, 1, 1, Ending::Release).await;
    assert!(matches!(
        claim_of(s, 1, &claim(5, 7)).await,
        Claimed::Done(_)
    ));

    // Released: the next claimer wins.
    assert!(matches!(claim_of(s, 2, &claim(1, 7)).await, Claimed::Won));
    end(s, 2, 1, Ending::Release).await;
    assert!(matches!(claim_of(s, 2, &claim(2, 7)).await, Claimed::Won));

    // Indeterminate: reported, or taken over when asked.
    assert!(matches!(claim_of(s, 3, &claim(1, 7)).await, Claimed::Won));
    end(s, 3, 1, Ending::Indeterminate { ttl }).await;
    match claim_of(s, 3, &claim(2, 7)).await {
        Claimed::Indeterminate { head } => assert_eq!(head, [7; 32]),
        other => panic!("expected indeterminate, got {other:?}"),
    }
    let take_over = Claim {
        take_over: true,
        ..claim(3, 7)
    };
    assert!(matches!(claim_of(s, 3, &take_over).await, Claimed::Won));
    assert!(matches!(
        claim_of(s, 3, &claim(4, 7)).await,
        Claimed::InFlight { .. }
    ));

    // A lease that runs out makes the entry indeterminate, never free.
    let short = Claim {
        lease: Duration::from_millis(100),
        ..claim(1, 7)
    };
    assert!(matches!(claim_of(s, 4, &short).await, Claimed::Won));
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert!(matches!(
        claim_of(s, 4, &claim(2, 7)).await,
        Claimed::Indeterminate { .. }
    ));
    // Its holder may still record what it got.
    keep(s, 4, 1, record(7, "late"), ttl).await;
    assert!(matches!(
        claim_of(s, 4, &claim(2, 7)).await,
        Claimed::Done(_)
    ));

    // Entries expire with their ttl.
    let brief = Claim {
        ttl: Duration::from_millis(100),
        ..claim(1, 7)
    };
    assert!(matches!(claim_of(s, 5, &brief).await, Claimed::Won));
    let brief_ttl = Duration::from_millis(100);
    keep(s, 5, 1, record(7, "x"), brief_ttl).await;
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert!(matches!(claim_of(s, 5, &claim(2, 7)).await, Claimed::Won));

    // Of many concurrent claimers, exactly one wins.
    let won = concurrent_winners(Arc::clone(&shared), 6).await;
    assert_eq!(won, 1, "concurrent claims of one entry");
}

/// Claims of entry `id` by 64 tasks at once; how many won.
async fn concurrent_winners(s: Arc<dyn Store>, id: u8) -> usize {
    let tasks: Vec<_> = (0..64u8)
        .map(|t| {
            let s = Arc::clone(&s);
            tokio::spawn(async move { store::claim(&*s, &[id; 32], &claim(t, 7), WAIT).await })
        })
        .collect();
    let mut won = 0;
    for task in tasks {
        if matches!(task.await.unwrap().expect("store answers"), Claimed::Won) {
            won += 1;
        }
    }
    won
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_memory_store_keeps_the_contract() {
    contract(Arc::new(MemoryStore::new(1000))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_file_store_keeps_the_contract_and_its_entries_across_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.redb");
    let file: Arc<dyn Store> = Arc::new(FileStore::open(&path).unwrap());
    contract(Arc::clone(&file)).await;
    // Left in flight by a process that then died.
    assert!(matches!(
        claim_of(&*file, 7, &claim(1, 7)).await,
        Claimed::Won
    ));
    drop(file);
    let reopened: Arc<dyn Store> = Arc::new(FileStore::open(&path).unwrap());
    assert!(matches!(
        claim_of(&*reopened, 1, &claim(9, 7)).await,
        Claimed::Done(_)
    ));
    assert!(
        matches!(
            claim_of(&*reopened, 7, &claim(9, 7)).await,
            Claimed::Indeterminate { .. }
        ),
        "an entry in flight when the file was last closed belongs to a dead process"
    );
    // One process per file: a second open is refused with a clear reason.
    let second = FileStore::open(&path).unwrap_err();
    assert!(second.contains("keys.redb"), "{second}");
}

#[tokio::test]
async fn the_redis_store_keeps_the_contract() {
    let Some(redis) = start_redis("the_redis_store_keeps_the_contract") else {
        return;
    };
    contract(Arc::new(RedisStore::new(&redis.url()).unwrap())).await;
}

#[tokio::test]
async fn concurrent_claims_from_many_connections_to_redis_have_one_winner() {
    let Some(redis) =
        start_redis("concurrent_claims_from_many_connections_to_redis_have_one_winner")
    else {
        return;
    };
    // Separate stores: separate connections, as separate writegate processes have.
    let stores: Vec<Arc<dyn Store>> = (0..8)
        .map(|_| Arc::new(RedisStore::new(&redis.url()).unwrap()) as Arc<dyn Store>)
        .collect();
    let tasks: Vec<_> = (0..64u8)
        .map(|t| {
            let s = Arc::clone(&stores[t as usize % stores.len()]);
            tokio::spawn(async move { store::claim(&*s, &[42; 32], &claim(t, 7), WAIT).await })
        })
        .collect();
    let mut won = 0;
    for task in tasks {
        if matches!(task.await.unwrap().expect("redis answers"), Claimed::Won) {
            won += 1;
        }
    }
    assert_eq!(won, 1);
}

#[tokio::test]
async fn a_redis_store_that_cannot_connect_fails_within_its_timeout() {
    let port = support::processes::free_port();
    let s = RedisStore::new(&format!("redis://127.0.0.1:{port}/0")).unwrap();
    let started = std::time::Instant::now();
    let failed = store::claim(&s, &[1; 32], &claim(1, 1), Duration::from_millis(500)).await;
    assert!(failed.is_err());
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[tokio::test]
async fn a_full_memory_store_evicts_the_oldest_finished_entry_never_one_in_flight() {
    // 16 entries over 16 shards: one per shard. Ids that share a first byte share a shard.
    let s = MemoryStore::new(16);
    let id = |n: u8| {
        let mut id = [n; 32];
        id[0] = 0;
        id
    };
    let claim_in = |n: u8, token: u8| {
        let s = &s;
        async move { store::claim(s, &id(n), &claim(token, 7), WAIT).await }
    };
    let keep_in = |n: u8, token: u8| {
        let (s, ttl) = (&s, Duration::from_secs(60));
        async move {
            let ending = Ending::Record {
                record: record(7, "r"),
                ttl,
            };
            store::finish(s, &id(n), &[token; 16], ending, WAIT)
                .await
                .unwrap();
        }
    };
    assert!(matches!(claim_in(1, 1).await.unwrap(), Claimed::Won));
    // The shard's one entry is in flight: nothing can make room.
    let full = claim_in(2, 2).await;
    assert!(full.is_err(), "{full:?}");
    keep_in(1, 1).await;
    // Now the finished entry is evicted (early: it is counted) to make room.
    assert!(matches!(claim_in(2, 2).await.unwrap(), Claimed::Won));
    keep_in(2, 2).await;
    // The evicted key is no longer recognized: a retry of it would be sent again.
    assert!(matches!(claim_in(1, 3).await.unwrap(), Claimed::Won));
    assert_eq!(s.entries(), Some(1));
}
