//! Prometheus metrics (`/metrics` on the admin listener), via
//! `prometheus-client`.
//!
//! One [`Metrics`] lives for the whole process and survives config reloads,
//! so counters never reset on SIGHUP. Gauges that describe state (token
//! expiry and age, open connections) are set at scrape time from the source
//! of truth rather than maintained on the hot path.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

/// `route`, `status` labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// Route name, or `none` before routing.
    pub route: String,
    /// HTTP status code.
    pub status: u16,
}

/// `route` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabel {
    /// Route name.
    pub route: String,
}

/// `app`, `route` labels for usage attribution.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AppLabels {
    /// The app the request belongs to: an `[[apps]]` name, a `[referers]
    /// allowed` entry as configured, or `none` when no Referer/Origin was
    /// sent and that is allowed. Never the raw header: the label set stays
    /// as small as the config.
    pub app: String,
    /// Route name.
    pub route: String,
}

/// `version`, `commit` labels of `arcgis_proxy_build_info`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    /// Package version.
    pub version: &'static str,
    /// Git commit the binary was built from (`unknown` without one).
    pub commit: &'static str,
}

/// `listener` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabel {
    /// `https`: the TLS listener.
    pub listener: &'static str,
}

/// `app` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AppLabel {
    /// App name (see [`AppLabels::app`]).
    pub app: String,
}

/// `credential` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CredentialLabel {
    /// Credential name.
    pub credential: String,
}

/// `credential`, `outcome` labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FetchLabels {
    /// Credential name.
    pub credential: String,
    /// `ok`, `error` or `rejected`.
    pub outcome: &'static str,
}

fn latency_histogram() -> Histogram {
    // 1 ms … ~16 s
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

/// Every metric the proxy exports.
pub struct Metrics {
    registry: Registry,
    /// Requests answered, by route and status.
    pub requests: Family<RequestLabels, Counter>,
    /// Time to the upstream response head, by route.
    pub upstream_duration: Family<RouteLabel, Histogram, fn() -> Histogram>,
    /// Token endpoint calls by outcome.
    pub token_fetches: Family<FetchLabels, Counter>,
    /// Retries after an upstream refused the proxy's token.
    pub token_retries: Family<CredentialLabel, Counter>,
    /// Seconds the current token may still be injected.
    pub token_expires_in: Family<CredentialLabel, Gauge<f64, AtomicU64>>,
    /// Seconds since the current token was obtained.
    pub token_age: Family<CredentialLabel, Gauge<f64, AtomicU64>>,
    /// Requests refused by the Referer/Origin policy.
    pub referer_rejections: Counter,
    /// Requests refused by a rate limit, by route.
    pub rate_limited: Family<RouteLabel, Counter>,
    /// Connections open on the public listeners.
    pub open_connections: Gauge,
    /// Config reloads by outcome.
    pub reloads: Family<OutcomeLabel, Counter>,
    /// Requests by allowlist entry and route (usage attribution).
    pub app_requests: Family<AppLabels, Counter>,
    /// Response body bytes by allowlist entry and route.
    pub app_bytes: Family<AppLabels, Counter>,
    /// Shared rate-limit store calls that failed or ran over budget.
    pub rate_limit_store_errors: Counter,
    /// Requests refused because their app may not use the route.
    pub app_rejections: Family<AppLabels, Counter>,
    /// Requests refused by an app's per-client rate limit.
    pub app_rate_limited: Family<AppLabel, Counter>,
    /// Requests refused because the app's quota was used up.
    pub app_quota_exhausted: Family<AppLabel, Counter>,
    /// Requests left in the app's quota window, as this process saw last.
    pub app_quota_remaining: Family<AppLabel, Gauge>,
    /// When each TLS listener's certificate expires (Unix seconds).
    pub tls_cert_not_after: Family<ListenerLabel, Gauge>,
    /// The process's resident memory, CPU time, open descriptors and start
    /// time, read from `/proc/self` at each scrape.
    process: ProcessMetrics,
}

#[derive(Default)]
struct ProcessMetrics {
    resident_memory: Gauge,
    cpu_seconds: Counter<f64, AtomicU64>,
    open_fds: Gauge,
    start_time: Gauge<f64, AtomicU64>,
}

/// `outcome` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    /// `ok` or `error`.
    pub outcome: &'static str,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Metrics {
        let mut m = Metrics {
            registry: Registry::default(),
            requests: Family::default(),
            upstream_duration: Family::new_with_constructor(latency_histogram),
            token_fetches: Family::default(),
            token_retries: Family::default(),
            token_expires_in: Family::default(),
            token_age: Family::default(),
            referer_rejections: Counter::default(),
            rate_limited: Family::default(),
            open_connections: Gauge::default(),
            reloads: Family::default(),
            app_requests: Family::default(),
            app_bytes: Family::default(),
            rate_limit_store_errors: Counter::default(),
            app_rejections: Family::default(),
            app_rate_limited: Family::default(),
            app_quota_exhausted: Family::default(),
            app_quota_remaining: Family::default(),
            tls_cert_not_after: Family::default(),
            process: ProcessMetrics::default(),
        };
        m.register_process();
        m.register_apps();
        m.register_requests();
        m
    }

    /// The build, the certificates and the process figures.
    fn register_process(&mut self) {
        let registry = &mut self.registry;
        let build_info = Family::<BuildLabels, Gauge>::default();
        build_info
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
                commit: env!("AAP_GIT_COMMIT"),
            })
            .set(1);
        registry.register(
            "arcgis_proxy_build_info",
            "Version and commit of the running binary (always 1)",
            build_info,
        );
        registry.register(
            "arcgis_proxy_tls_cert_not_after_seconds",
            "When the listener's certificate expires, Unix time",
            self.tls_cert_not_after.clone(),
        );
        registry.register(
            "process_resident_memory_bytes",
            "Resident memory size in bytes",
            self.process.resident_memory.clone(),
        );
        registry.register(
            "process_cpu_seconds",
            "User and system CPU time spent in seconds",
            self.process.cpu_seconds.clone(),
        );
        registry.register(
            "process_open_fds",
            "Number of open file descriptors",
            self.process.open_fds.clone(),
        );
        registry.register(
            "process_start_time_seconds",
            "Start time of the process since the Unix epoch in seconds",
            self.process.start_time.clone(),
        );
    }

    /// Per-app refusals, quotas and usage.
    fn register_apps(&mut self) {
        let registry = &mut self.registry;
        registry.register(
            "arcgis_proxy_app_rejections",
            "Requests refused because their app may not use the route",
            self.app_rejections.clone(),
        );
        registry.register(
            "arcgis_proxy_app_rate_limited",
            "Requests refused by an app's per-client rate limit",
            self.app_rate_limited.clone(),
        );
        registry.register(
            "arcgis_proxy_app_quota_exhausted",
            "Requests refused because the app's quota for the window was used up",
            self.app_quota_exhausted.clone(),
        );
        registry.register(
            "arcgis_proxy_app_quota_remaining",
            "Requests left in the app's quota window (this process's view)",
            self.app_quota_remaining.clone(),
        );
        registry.register(
            "arcgis_proxy_rate_limit_store_errors",
            "Shared rate-limit store calls that failed or exceeded their time budget",
            self.rate_limit_store_errors.clone(),
        );
        registry.register(
            "arcgis_proxy_app_requests",
            "Requests by the allowlist entry that admitted them, and route",
            self.app_requests.clone(),
        );
        registry.register(
            "arcgis_proxy_app_response_bytes",
            "Response body bytes sent, by allowlist entry and route",
            self.app_bytes.clone(),
        );
    }

    /// Requests, the upstream, tokens, the policy and the process's state.
    fn register_requests(&mut self) {
        let registry = &mut self.registry;
        registry.register(
            "arcgis_proxy_requests",
            "Requests answered, by route and HTTP status",
            self.requests.clone(),
        );
        registry.register(
            "arcgis_proxy_upstream_duration_seconds",
            "Time from sending a request upstream to its response head",
            self.upstream_duration.clone(),
        );
        registry.register(
            "arcgis_proxy_token_fetches",
            "Token endpoint requests by outcome (ok, error, rejected)",
            self.token_fetches.clone(),
        );
        registry.register(
            "arcgis_proxy_token_retries",
            "Requests retried with a new token after the upstream refused the old one",
            self.token_retries.clone(),
        );
        registry.register(
            "arcgis_proxy_token_expires_in_seconds",
            "Seconds the current token may still be injected",
            self.token_expires_in.clone(),
        );
        registry.register(
            "arcgis_proxy_token_age_seconds",
            "Seconds since the current token was obtained",
            self.token_age.clone(),
        );
        registry.register(
            "arcgis_proxy_referer_rejections",
            "Requests refused by the Referer/Origin allowlist",
            self.referer_rejections.clone(),
        );
        registry.register(
            "arcgis_proxy_rate_limited",
            "Requests refused by a per-client rate limit, by route",
            self.rate_limited.clone(),
        );
        registry.register(
            "arcgis_proxy_open_connections",
            "Connections open on the public listeners",
            self.open_connections.clone(),
        );
        registry.register(
            "arcgis_proxy_config_reloads",
            "Configuration reloads by outcome",
            self.reloads.clone(),
        );
    }

    /// Reads the process figures from `/proc/self` (Linux; elsewhere they
    /// stay 0). Called before each scrape.
    pub fn refresh_process(&self) {
        let now = read_process();
        let p = &self.process;
        if let Some(rss) = now.rss_bytes {
            p.resident_memory
                .set(i64::try_from(rss).unwrap_or(i64::MAX));
        }
        if let Some(fds) = now.open_fds {
            p.open_fds.set(fds);
        }
        if let Some(start) = now.start_time {
            p.start_time.set(start);
        }
        if let Some(cpu) = now.cpu_seconds {
            let delta = cpu - p.cpu_seconds.get();
            if delta > 0.0 {
                p.cpu_seconds.inc_by(delta);
            }
        }
    }

    /// Counts one token fetch.
    pub fn token_fetch(&self, credential: &str, outcome: &'static str) {
        self.token_fetches
            .get_or_create(&FetchLabels {
                credential: credential.to_string(),
                outcome,
            })
            .inc();
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// What could be read; each figure on its own, since a sandbox may hide
/// some of `/proc` (systemd's `ProcSubset=pid` hides `/proc/stat`).
#[derive(Default)]
struct ProcessNow {
    rss_bytes: Option<u64>,
    cpu_seconds: Option<f64>,
    open_fds: Option<i64>,
    start_time: Option<f64>,
}

/// Figures of this process from `/proc`: `stat` fields 14/15 (utime,
/// stime) and 22 (start, since boot) in clock ticks, which Linux reports in
/// USER_HZ = 100 on every architecture; VmRSS from `status`; `btime` from
/// `/proc/stat`.
fn read_process() -> ProcessNow {
    const TICKS: f64 = 100.0;
    let mut now = ProcessNow::default();
    let mut started_after_boot = None;
    if let Ok(stat) = std::fs::read_to_string("/proc/self/stat")
        && let Some(close) = stat.rfind(')')
    {
        // The command name may hold spaces and parentheses: fields start
        // after the last `)`, and fields[0] is field 3 (state).
        let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<u64>().ok());
        if let (Some(u), Some(s)) = (field(14), field(15)) {
            now.cpu_seconds = Some((u + s) as f64 / TICKS);
        }
        started_after_boot = field(22).map(|t| t as f64 / TICKS);
    }
    now.rss_bytes = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map(|kib| kib * 1024);
    let boot: Option<f64> = std::fs::read_to_string("/proc/stat").ok().and_then(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("btime "))
            .and_then(|v| v.trim().parse().ok())
    });
    now.start_time = boot.zip(started_after_boot).map(|(b, s)| b + s);
    now.open_fds = std::fs::read_dir("/proc/self/fd")
        .ok()
        .map(|d| d.count() as i64);
    now
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_names_match_the_contract() {
        let m = Metrics::new();
        m.requests
            .get_or_create(&RequestLabels {
                route: "basemaps".into(),
                status: 200,
            })
            .inc();
        m.token_fetch("online", "ok");
        m.upstream_duration
            .get_or_create(&RouteLabel {
                route: "basemaps".into(),
            })
            .observe(0.02);
        m.referer_rejections.inc();
        let text = m.encode();
        for needle in [
            "arcgis_proxy_requests_total{route=\"basemaps\",status=\"200\"} 1",
            "arcgis_proxy_token_fetches_total{credential=\"online\",outcome=\"ok\"} 1",
            "arcgis_proxy_upstream_duration_seconds_bucket{le=\"0.032\",route=\"basemaps\"} 1",
            "arcgis_proxy_referer_rejections_total 1",
            "# TYPE arcgis_proxy_open_connections gauge",
            "# EOF",
        ] {
            assert!(text.contains(needle), "{needle} missing in\n{text}");
        }
    }
}
