//! Entries in Redis, shared by every writegate process that points at the same server.
//!
//! A claim is `SET entry value NX PX ttl` inside a script that also sets the claim's lease as a
//! second key with its own expiry (`PX lease`), so that no process's clock takes part: a lease
//! runs out when Redis expires its key. Completing, releasing and marking an entry indeterminate
//! are one script each, which first checks that the entry is still the caller's claim. Both keys
//! share a hash tag, so the scripts also work on Redis Cluster.
//!
//! One multiplexed connection (redis-rs's `ConnectionManager`) carries every request of the
//! process, pipelined, and is re-established after a loss; each call is bounded by the route's
//! `store_timeout`.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Script, Value};
use tokio::sync::OnceCell;

use super::{ms, Claim, Claimed, Ending, Store, StoreError, StoreFuture, StoreMetrics};
use crate::idempotency::{hex, Digest, Entry, Token};

/// Longest wait for a connection to Redis.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Returns `{1}` when the claim won, else `{0, entry, lease ms left}`.
const CLAIM: &str = r"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[3]) then
  redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[4])
  return {1}
end
local entry = redis.call('GET', KEYS[1])
local state = string.sub(entry, 1, 1)
local left = redis.call('PTTL', KEYS[2])
if state == 'F' and left > 0 then
  return {0, entry, left}
end
if ARGV[5] == '1' and (state == 'F' or state == 'I') then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
  redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[4])
  return {1}
end
return {0, entry, 0}
";

/// ARGV[2] is the done entry, `I` to mark the entry indeterminate, or empty to release it.
const FINISH: &str = r"
local entry = redis.call('GET', KEYS[1])
if not entry or string.sub(entry, 1, 1) ~= 'F' or string.sub(entry, 2, 17) ~= ARGV[1] then
  return 0
end
redis.call('DEL', KEYS[2])
if ARGV[2] == '' then
  redis.call('DEL', KEYS[1])
elseif ARGV[2] == 'I' then
  redis.call('SET', KEYS[1], 'I' .. string.sub(entry, 18, 49), 'PX', ARGV[3])
else
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
end
return 1
";

pub struct RedisStore {
    client: redis::Client,
    connection: OnceCell<ConnectionManager>,
    label: String,
    claim: Script,
    finish: Script,
    metrics: StoreMetrics,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("label", &self.label)
            .finish()
    }
}

fn failed(error: redis::RedisError) -> StoreError {
    StoreError::Unavailable(error.to_string())
}

impl RedisStore {
    /// Parses `url`; the connection is made by the first request that needs it.
    pub fn new(url: &str) -> Result<RedisStore, String> {
        let client = redis::Client::open(url).map_err(|e| format!("bad redis_url: {e}"))?;
        let info = client.get_connection_info();
        let label = format!("redis:{}/{}", info.addr(), info.redis_settings().db());
        Ok(RedisStore {
            metrics: StoreMetrics::new(&label),
            label,
            client,
            connection: OnceCell::new(),
            claim: Script::new(CLAIM),
            finish: Script::new(FINISH),
        })
    }

    async fn connection(&self) -> Result<ConnectionManager, StoreError> {
        let connection = self
            .connection
            .get_or_try_init(|| {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(CONNECT_TIMEOUT))
                    .set_number_of_retries(1);
                ConnectionManager::new_with_config(self.client.clone(), config)
            })
            .await
            .map_err(failed)?;
        Ok(connection.clone())
    }

    async fn claim_now(&self, id: &Digest, claim: &Claim) -> Result<Claimed, StoreError> {
        let (entry_key, lease_key) = keys(id);
        let in_flight = Entry::InFlight {
            token: claim.token,
            head: claim.head,
            lease_until_ms: 0,
        }
        .encode();
        let mut connection = self.connection().await?;
        let reply: Vec<Value> = self
            .claim
            .key(&entry_key)
            .key(&lease_key)
            .arg(in_flight)
            .arg(&claim.token[..])
            .arg(ms(claim.ttl).max(1))
            .arg(ms(claim.lease).max(1))
            .arg(if claim.take_over { "1" } else { "0" })
            .invoke_async(&mut connection)
            .await
            .map_err(failed)?;
        match reply.as_slice() {
            [Value::Int(1)] => Ok(Claimed::Won),
            [Value::Int(0), Value::BulkString(entry), Value::Int(left)] => {
                let entry =
                    Entry::decode(entry).map_err(|e| StoreError::Unavailable(e.to_string()))?;
                Ok(match entry {
                    Entry::InFlight { head, .. } if *left > 0 => Claimed::InFlight {
                        head,
                        lease_left: Duration::from_millis(*left as u64),
                    },
                    Entry::InFlight { head, .. } | Entry::Indeterminate { head } => {
                        Claimed::Indeterminate { head }
                    }
                    Entry::Done(record) => Claimed::Done(record),
                })
            }
            _ => Err(StoreError::Unavailable(format!(
                "unexpected reply to the claim script: {reply:?}"
            ))),
        }
    }

    async fn finish_now(
        &self,
        id: &Digest,
        token: &Token,
        ending: Ending,
    ) -> Result<(), StoreError> {
        let (entry_key, lease_key) = keys(id);
        let (next, ttl) = match ending {
            Ending::Record { record, ttl } => (Entry::Done(record).encode(), ttl),
            Ending::Indeterminate { ttl } => (b"I".to_vec(), ttl),
            Ending::Release => (Vec::new(), Duration::from_millis(1)),
        };
        let mut connection = self.connection().await?;
        let _: i64 = self
            .finish
            .key(&entry_key)
            .key(&lease_key)
            .arg(&token[..])
            .arg(next)
            .arg(ms(ttl).max(1))
            .invoke_async(&mut connection)
            .await
            .map_err(failed)?;
        Ok(())
    }
}

/// The entry's key and its lease's, in one hash slot.
fn keys(id: &Digest) -> (String, String) {
    let entry = format!("writegate:idem:{{{}}}", hex(id));
    let lease = format!("{entry}:lease");
    (entry, lease)
}

impl Store for RedisStore {
    fn label(&self) -> &str {
        &self.label
    }

    fn claim<'a>(&'a self, id: &'a Digest, claim: &'a Claim) -> StoreFuture<'a, Claimed> {
        Box::pin(self.claim_now(id, claim))
    }

    fn finish<'a>(
        &'a self,
        id: &'a Digest,
        token: &'a Token,
        ending: Ending,
    ) -> StoreFuture<'a, ()> {
        Box::pin(self.finish_now(id, token, ending))
    }

    fn entries(&self) -> Option<u64> {
        None
    }

    fn metrics(&self) -> &StoreMetrics {
        &self.metrics
    }
}
