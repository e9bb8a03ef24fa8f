//! Cluster-wide rate limits: the same GCRA as [`crate::policy::rate`], kept
//! in Redis so that N replicas together admit what one would.
//!
//! One Lua script per request does the whole decision atomically on the
//! server (one round trip), using Redis' clock so replicas agree on time.
//! Each call has a time budget; when Redis is slow or down the proxy falls
//! back as configured — to its local limiter, or open (admit), or closed
//! (refuse) — and counts it.

use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use redis::aio::ConnectionManager;

use crate::config::StoreFallback;
use crate::policy::quota::{QuotaSpec, QuotaVerdict, until};

/// GCRA: `ARGV[1]` emission interval (µs), `ARGV[2]` bucket span (µs, the
/// whole period). Returns 0 when admitted, else the wait in µs.
/// Microseconds, not milliseconds: a 1 ms interval capped every limit at
/// 1,000 requests per second per client (a route allowing a million a
/// second refused from the 1,001st), and Unix time in µs is still exact
/// in Lua's doubles (below 2^53).
const GCRA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local span = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + interval
local allow_at = new_tat - span
if allow_at > now then return allow_at - now end
redis.call('SET', KEYS[1], string.format('%d', new_tat), 'PX', math.ceil(span / 1000))
return 0
";

/// Quota count: `KEYS[1]` the app's key for this window, `ARGV[1]` the
/// quota, `ARGV[2]` the window's end (Unix seconds). Counts the request and
/// returns the count, or -1 without counting when the quota is used up. The
/// key expires with its window.
const QUOTA: &str = r"
local n = tonumber(redis.call('GET', KEYS[1]) or '0')
if n >= tonumber(ARGV[1]) then return -1 end
n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('EXPIREAT', KEYS[1], tonumber(ARGV[2]) + 60) end
return n
";

/// The shared store and what to do without it.
pub struct SharedStore {
    conn: ConnectionManager,
    script: redis::Script,
    quota: redis::Script,
    budget: Duration,
    /// What to do when the store does not answer in time.
    pub fallback: StoreFallback,
}

impl SharedStore {
    /// Connects lazily to the configured store (the first request opens
    /// the connection): `redis://` or `rediss://` (TLS, verified against
    /// `store_ca` or the system's roots), with the password from the config
    /// when it is not in the URL.
    pub fn new(cfg: &crate::config::RateLimitStore) -> redis::RedisResult<Self> {
        use redis::IntoConnectionInfo;
        let mut info = cfg.url.as_str().into_connection_info()?;
        if let Some(pw) = &cfg.password {
            let settings = info.redis_settings().clone().set_password(pw.expose());
            info = info.set_redis_settings(settings);
        }
        let client = match &cfg.ca_pem {
            Some(pem) => redis::Client::build_with_tls(
                info,
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem.clone()),
                },
            )?,
            None => redis::Client::open(info)?,
        };
        let budget = cfg.budget;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(budget.max(Duration::from_millis(100))))
            .set_response_timeout(Some(budget))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(2));
        Ok(SharedStore {
            conn: ConnectionManager::new_lazy_with_config(client, config)?,
            script: redis::Script::new(GCRA),
            quota: redis::Script::new(QUOTA),
            budget,
            fallback: cfg.on_error,
        })
    }

    /// Takes one token from the bucket of `client` on `route`: `Ok(None)`
    /// admitted, `Ok(Some(wait))` refused, `Err(())` the store did not
    /// answer within the budget.
    pub async fn check(
        &self,
        route: &str,
        client: IpAddr,
        requests: u32,
        per: Duration,
    ) -> Result<Option<Duration>, ()> {
        let span = per.as_micros().max(1) as u64;
        let interval = (span / u64::from(requests.max(1))).max(1);
        let key = format!("arcgis-app-proxy:rl:{route}:{client}");
        let mut conn = self.conn.clone();
        let call = async move {
            self.script
                .key(key)
                .arg(interval)
                .arg(span)
                .invoke_async::<u64>(&mut conn)
                .await
        };
        match tokio::time::timeout(self.budget, call).await {
            Ok(Ok(0)) => Ok(None),
            Ok(Ok(wait_us)) => Ok(Some(Duration::from_micros(wait_us))),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "rate-limit store failed");
                Err(())
            }
            Err(_) => Err(()),
        }
    }

    /// Counts one request of `app` against its quota in the window holding
    /// `now`, cluster-wide; `Err(())` when the store did not answer within
    /// the budget.
    pub async fn take_quota(
        &self,
        app: &str,
        spec: QuotaSpec,
        now: SystemTime,
    ) -> Result<QuotaVerdict, ()> {
        let (start, end) = spec.per.bounds(now);
        let key = format!("arcgis-app-proxy:quota:{app}:{}:{start}", spec.per.as_str());
        let mut conn = self.conn.clone();
        let call = async move {
            self.quota
                .key(key)
                .arg(spec.requests)
                .arg(end)
                .invoke_async::<i64>(&mut conn)
                .await
        };
        match tokio::time::timeout(self.budget, call).await {
            Ok(Ok(n)) if n >= 0 => Ok(QuotaVerdict::Admitted {
                remaining: spec.requests.saturating_sub(n as u64),
            }),
            Ok(Ok(_)) => Ok(QuotaVerdict::Exhausted {
                retry_after: until(end, now),
            }),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "quota store failed");
                Err(())
            }
            Err(_) => Err(()),
        }
    }
}
