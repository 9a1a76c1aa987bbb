//! Tenants: the `--tenants` file (who may call, with which keys, and their shares and limits).
//!
//! ```toml
//! [admin]
//! key_sha256 = ["<hex sha256 of the admin key>"]
//! [[tenant]]
//! name = "acme"                    # [a-z0-9_-], unique
//! key_sha256 = ["<hex>", "<hex>"]  # keys are never stored in clear
//! weight = 1.0                     # fair-share weight
//! rpm = 600                        # requests per minute (0 = unlimited)
//! tpm = 200000                     # prompt+completion tokens per minute (0 = unlimited)
//! max_concurrency = 32             # running + waiting requests (0 = unlimited)
//! max_priority = 0                 # lowest `priority` value it may ask for
//! share_prefix_cache = false       # may hit other sharing tenants' cached blocks
//! ```
//!
//! A bad file is an error naming the file, the line and the field. Keys are compared by their
//! SHA-256 ([`hash_key`]); a key may belong to one tenant (or the admin) only.
//!
//! Serving with `--tenants` ([`Registry`]): keys identify the tenant (or the admin), each
//! tenant's prefix-cache blocks are its own unless it shares, and `max_concurrency` bounds its
//! requests in flight, `rpm` and `tpm` its request and token rates ([`Registry::take_request`],
//! [`Registry::take_tokens`]), `weight` and `max_priority` its share of the scheduler
//! ([`fair`]). A reloaded file keeps what the limits of a tenant of the same name counted.

pub mod fair;

use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use toml::Spanned;

/// The hex SHA-256 of a key, as the tenants file stores it.
pub fn hash_key(key: &str) -> String {
    Sha256::digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct AdminRaw {
    #[serde(default)]
    key_sha256: Vec<Spanned<String>>,
}

fn one() -> Spanned<f64> {
    Spanned::new(0..0, 1.0)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct TenantRaw {
    name: Spanned<String>,
    key_sha256: Vec<Spanned<String>>,
    #[serde(default = "one")]
    weight: Spanned<f64>,
    #[serde(default)]
    rpm: Option<Spanned<i64>>,
    #[serde(default)]
    tpm: Option<Spanned<i64>>,
    #[serde(default)]
    max_concurrency: Option<Spanned<i64>>,
    #[serde(default)]
    max_priority: i64,
    #[serde(default)]
    share_prefix_cache: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRaw {
    admin: Option<AdminRaw>,
    #[serde(default)]
    tenant: Vec<TenantRaw>,
}

/// One tenant, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Tenant {
    pub name: String,
    pub key_sha256: Vec<String>,
    pub weight: f64,
    /// 0 = unlimited
    pub rpm: u64,
    /// 0 = unlimited
    pub tpm: u64,
    /// 0 = unlimited
    pub max_concurrency: u64,
    pub max_priority: i64,
    pub share_prefix_cache: bool,
}

/// A validated tenants file.
#[derive(Debug, Clone, PartialEq)]
pub struct Tenants {
    pub admin_keys: Vec<String>,
    pub tenants: Vec<Tenant>,
}

/// 1-based line of byte `offset` in `text`.
fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

impl Tenants {
    /// Parse and validate `text` (from `path`, for the messages).
    pub fn parse(text: &str, path: &str) -> Result<Tenants, String> {
        let raw: FileRaw = toml::from_str(text).map_err(|e| {
            let at = e
                .span()
                .map(|s| format!(":{}", line_of(text, s.start)))
                .unwrap_or_default();
            format!("{path}{at}: {}", e.message())
        })?;
        let err = |span: std::ops::Range<usize>, field: &str, msg: String| {
            format!("{path}:{}: {field}: {msg}", line_of(text, span.start))
        };
        let mut owner: HashMap<String, String> = HashMap::new();
        let mut check_key = |k: &Spanned<String>,
                             who: &str,
                             field: &str|
         -> Result<String, String> {
            let h = k.get_ref();
            if h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(err(
                    k.span(),
                    field,
                    format!("'{h}' is not a hex SHA-256 (64 hex digits; `kojo tenants hash-key` prints one)"),
                ));
            }
            let h = h.to_ascii_lowercase();
            if let Some(prev) = owner.insert(h.clone(), who.to_string()) {
                return Err(err(k.span(), field, format!("this key is also {prev}'s")));
            }
            Ok(h)
        };
        let mut admin_keys = Vec::new();
        if let Some(a) = &raw.admin {
            for k in &a.key_sha256 {
                admin_keys.push(check_key(k, "the admin", "admin.key_sha256")?);
            }
        }
        let mut tenants: Vec<Tenant> = Vec::new();
        for (i, t) in raw.tenant.iter().enumerate() {
            let name = t.name.get_ref();
            let field = |f: &str| format!("tenant[{i}].{f}");
            let ok_name = (1..=64).contains(&name.len())
                && name.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-'
                });
            if !ok_name {
                return Err(err(
                    t.name.span(),
                    &field("name"),
                    format!("'{name}' must be 1 to 64 of a-z, 0-9, _ and -"),
                ));
            }
            if tenants.iter().any(|x| &x.name == name) {
                return Err(err(
                    t.name.span(),
                    &field("name"),
                    format!("two tenants are named '{name}'"),
                ));
            }
            if t.key_sha256.is_empty() {
                return Err(err(
                    t.name.span(),
                    &field("key_sha256"),
                    "a tenant needs at least one key".into(),
                ));
            }
            let who = format!("tenant '{name}'");
            let keys = t
                .key_sha256
                .iter()
                .map(|k| check_key(k, &who, &field("key_sha256")))
                .collect::<Result<Vec<_>, _>>()?;
            let w = *t.weight.get_ref();
            if !(w.is_finite() && w > 0.0 && w <= 1e6) {
                let span = if t.weight.span().is_empty() {
                    t.name.span()
                } else {
                    t.weight.span()
                };
                return Err(err(
                    span,
                    &field("weight"),
                    format!("must be a number in (0, 1e6], got {w}"),
                ));
            }
            let limit = |v: &Option<Spanned<i64>>, f: &str| -> Result<u64, String> {
                match v {
                    None => Ok(0),
                    Some(x) if *x.get_ref() >= 0 => Ok(*x.get_ref() as u64),
                    Some(x) => Err(err(
                        x.span(),
                        &field(f),
                        format!("must be 0 (unlimited) or more, got {}", x.get_ref()),
                    )),
                }
            };
            tenants.push(Tenant {
                name: name.clone(),
                key_sha256: keys,
                weight: w,
                rpm: limit(&t.rpm, "rpm")?,
                tpm: limit(&t.tpm, "tpm")?,
                max_concurrency: limit(&t.max_concurrency, "max_concurrency")?,
                max_priority: t.max_priority,
                share_prefix_cache: t.share_prefix_cache,
            });
        }
        Ok(Tenants {
            admin_keys,
            tenants,
        })
    }

    /// Read and validate a tenants file.
    pub fn load(path: &std::path::Path) -> Result<Tenants, String> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| format!("{shown}: {e}"))?;
        Tenants::parse(&text, &shown)
    }
}

/// Who made a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Who {
    Admin,
    /// index into [`Registry::tenant`]
    Tenant(usize),
}

/// A token bucket: `level` of `capacity`, refilled at `capacity` per minute. The level may go
/// below zero (tokens charged after the fact): then nothing fits until it refills.
#[derive(Debug)]
struct Bucket {
    level: f64,
    at: std::time::Instant,
}

impl Bucket {
    fn full(capacity: u64) -> std::sync::Mutex<Bucket> {
        std::sync::Mutex::new(Bucket {
            level: capacity as f64,
            at: std::time::Instant::now(),
        })
    }

    /// Refill up to now; the rate per second.
    fn refill(&mut self, capacity: u64) -> f64 {
        let now = std::time::Instant::now();
        let rate = capacity as f64 / 60.0;
        self.level =
            (self.level + now.duration_since(self.at).as_secs_f64() * rate).min(capacity as f64);
        self.at = now;
        rate
    }

    /// Take `n` if they are there; what the budget is after, for the headers.
    fn take(
        &mut self,
        capacity: u64,
        n: f64,
        kind: &'static str,
        tenant: &str,
    ) -> (bool, RateInfo) {
        let rate = self.refill(capacity);
        let ok = self.level >= n;
        if ok {
            self.level -= n;
        }
        let info = RateInfo {
            kind,
            limit: capacity,
            remaining: self.level.max(0.0).floor() as u64,
            reset_secs: (capacity as f64 - self.level) / rate,
            next_secs: ((n - self.level).max(0.0) / rate).ceil().max(1.0) as u64,
            tenant: tenant.to_string(),
        };
        (ok, info)
    }
}

/// What a tenant's limits count, kept across reloads (by the tenant's name): its request and
/// token buckets and its requests in flight.
#[derive(Debug)]
pub struct Usage {
    requests: std::sync::Mutex<Bucket>,
    tokens: std::sync::Mutex<Bucket>,
    in_flight: std::sync::atomic::AtomicU64,
}

struct TenantState {
    cfg: Tenant,
    /// prefix-cache key: 0 (the shared pool) when the tenant shares, else its own
    salt: u64,
    usage: std::sync::Arc<Usage>,
}

/// The tenants a server runs with: key lookup, prefix-cache salts, shares, limits.
pub struct Registry {
    tenants: Vec<TenantState>,
    by_key: HashMap<String, Who>,
}

/// A tenant's request or token budget after one request, for OpenAI's `x-ratelimit-*` headers.
#[derive(Debug, Clone, PartialEq)]
pub struct RateInfo {
    /// "requests" or "tokens"
    pub kind: &'static str,
    pub limit: u64,
    pub remaining: u64,
    /// seconds until the budget is full again
    pub reset_secs: f64,
    /// whole seconds until this request would fit (Retry-After)
    pub next_secs: u64,
    pub tenant: String,
}

impl RateInfo {
    /// `x-ratelimit-limit-{kind}`, `-remaining-{kind}`, `-reset-{kind}`.
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        let [limit, remaining, reset] = if self.kind == "tokens" {
            [
                "x-ratelimit-limit-tokens",
                "x-ratelimit-remaining-tokens",
                "x-ratelimit-reset-tokens",
            ]
        } else {
            [
                "x-ratelimit-limit-requests",
                "x-ratelimit-remaining-requests",
                "x-ratelimit-reset-requests",
            ]
        };
        vec![
            (limit, self.limit.to_string()),
            (remaining, self.remaining.to_string()),
            (reset, format!("{:.3}s", self.reset_secs.max(0.0))),
        ]
    }
}

/// Why a request's tokens were refused.
#[derive(Debug, Clone, PartialEq)]
pub enum TokensRefused {
    /// more than the tenant's whole tpm: it could never run (a 400)
    Never(String),
    /// not now (a 429)
    Later(RateInfo),
}

/// One request's hold on its tenant's concurrency (released when dropped).
pub struct Slot {
    usage: std::sync::Arc<Usage>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.usage
            .in_flight
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// The tokens a request took from its tenant's tpm budget up front; [`Account::settle`] charges
/// what it really used.
pub struct Account {
    usage: std::sync::Arc<Usage>,
    tpm: u64,
    taken: u64,
    settled: bool,
}

impl Account {
    /// The request used `used` tokens (prompt and completion): charge the difference to what
    /// was taken up front (a refund when it used less).
    pub fn settle(&mut self, used: u64) {
        if std::mem::replace(&mut self.settled, true) {
            return;
        }
        let mut b = self.usage.tokens.lock().unwrap_or_else(|e| e.into_inner());
        b.refill(self.tpm);
        b.level = (b.level - used as f64 + self.taken as f64).min(self.tpm as f64);
    }
}

/// A prefix-cache salt of its own for `name` (never 0, the shared pool's).
fn salt_of(name: &str) -> u64 {
    let d = Sha256::digest(format!("kojo-tenant:{name}").as_bytes());
    u64::from_le_bytes(d[..8].try_into().unwrap()) | 1
}

/// The prefix-cache salt of a request that gives its own `cache_salt` (vLLM's field) on top of
/// its tenant's `base`: requests share blocks only when both agree.
pub fn request_salt(base: u64, cache_salt: Option<&str>) -> u64 {
    match cache_salt {
        None => base,
        Some(s) => {
            let d = Sha256::digest(format!("kojo-request:{base}:{s}").as_bytes());
            u64::from_le_bytes(d[..8].try_into().unwrap()) | 1
        }
    }
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.tenants.iter().map(|t| t.cfg.name.as_str()).collect();
        write!(f, "Registry {{ tenants: {names:?} }}")
    }
}

impl Registry {
    pub fn new(t: Tenants) -> Registry {
        Registry::build(t, None)
    }

    /// The registry of a reloaded file: a tenant that keeps its name keeps what its limits
    /// counted (its buckets, its requests in flight); keys are the new file's only.
    pub fn reloaded(&self, t: Tenants) -> Registry {
        Registry::build(t, Some(self))
    }

    fn build(t: Tenants, old: Option<&Registry>) -> Registry {
        let mut by_key = HashMap::new();
        for k in t.admin_keys {
            by_key.insert(k, Who::Admin);
        }
        let tenants = t
            .tenants
            .into_iter()
            .enumerate()
            .map(|(i, cfg)| {
                for k in &cfg.key_sha256 {
                    by_key.insert(k.clone(), Who::Tenant(i));
                }
                let kept = old.and_then(|o| {
                    o.tenants
                        .iter()
                        .find(|x| x.cfg.name == cfg.name)
                        .map(|x| x.usage.clone())
                });
                TenantState {
                    usage: kept.unwrap_or_else(|| {
                        std::sync::Arc::new(Usage {
                            requests: Bucket::full(cfg.rpm),
                            tokens: Bucket::full(cfg.tpm),
                            in_flight: Default::default(),
                        })
                    }),
                    salt: if cfg.share_prefix_cache {
                        0
                    } else {
                        salt_of(&cfg.name)
                    },
                    cfg,
                }
            })
            .collect();
        Registry { tenants, by_key }
    }

    /// Who holds `key` (compared by its SHA-256).
    pub fn identify(&self, key: &str) -> Option<Who> {
        self.by_key.get(&hash_key(key)).copied()
    }

    pub fn tenant(&self, i: usize) -> &Tenant {
        &self.tenants[i].cfg
    }

    pub fn len(&self) -> usize {
        self.tenants.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tenants.is_empty()
    }

    /// The name `who`'s requests are metered under ("admin" for the admin).
    pub fn name(&self, who: Who) -> &str {
        match who {
            Who::Admin => "admin",
            Who::Tenant(i) => &self.tenants[i].cfg.name,
        }
    }

    /// The prefix-cache key of `who`'s requests.
    pub fn cache_salt(&self, who: Who) -> u64 {
        match who {
            Who::Admin => salt_of("\0admin"),
            Who::Tenant(i) => self.tenants[i].salt,
        }
    }

    /// `who`'s share of the scheduler for a request asking for `priority` (vLLM's field: lower
    /// runs first); `Err` when the tenant may not ask for it (below its `max_priority`).
    pub fn share(&self, who: Who, priority: i64) -> Result<fair::Share, String> {
        let (weight, floor) = match who {
            Who::Admin => (1.0, i64::MIN),
            Who::Tenant(i) => (self.tenants[i].cfg.weight, self.tenants[i].cfg.max_priority),
        };
        if priority < floor {
            return Err(format!(
                "`priority` {priority} is below tenant '{}'s max_priority {floor} (lower runs first)",
                self.name(who)
            ));
        }
        Ok(fair::Share {
            tenant: std::sync::Arc::from(self.name(who)),
            weight,
            priority,
        })
    }

    /// Take one request from `who`'s requests-per-minute budget (a bucket of `rpm` refilled
    /// at `rpm` per minute). `Ok(None)`: no limit; `Ok(info)`: taken; `Err(info)`: empty.
    pub fn take_request(&self, who: Who) -> Result<Option<RateInfo>, RateInfo> {
        let Who::Tenant(i) = who else { return Ok(None) };
        let t = &self.tenants[i];
        let limit = t.cfg.rpm;
        if limit == 0 {
            return Ok(None);
        }
        let mut b = t.usage.requests.lock().unwrap_or_else(|e| e.into_inner());
        match b.take(limit, 1.0, "requests", &t.cfg.name) {
            (true, info) => Ok(Some(info)),
            (false, info) => Err(info),
        }
    }

    /// Take `tokens` (the prompt, plus `max_tokens` when the request set it) from `who`'s
    /// tokens-per-minute budget; the request settles what it really used when it ends.
    pub fn take_tokens(
        &self,
        who: Who,
        tokens: u64,
    ) -> Result<Option<(Account, RateInfo)>, TokensRefused> {
        let Who::Tenant(i) = who else { return Ok(None) };
        let t = &self.tenants[i];
        let limit = t.cfg.tpm;
        if limit == 0 {
            return Ok(None);
        }
        if tokens > limit {
            return Err(TokensRefused::Never(format!(
                "the request needs {tokens} tokens (its prompt, plus max_tokens when given); \
                 tenant '{}' has a tpm of {limit}, so it could never run",
                t.cfg.name
            )));
        }
        let mut b = t.usage.tokens.lock().unwrap_or_else(|e| e.into_inner());
        match b.take(limit, tokens as f64, "tokens", &t.cfg.name) {
            (true, info) => Ok(Some((
                Account {
                    usage: t.usage.clone(),
                    tpm: limit,
                    taken: tokens,
                    settled: false,
                },
                info,
            ))),
            (false, info) => Err(TokensRefused::Later(info)),
        }
    }

    /// A slot for one more request of `who` in flight; `Err` (for a 429) when its tenant's
    /// `max_concurrency` are already running or waiting.
    pub fn acquire(&self, who: Who) -> Result<Option<Slot>, String> {
        use std::sync::atomic::Ordering;
        let Who::Tenant(i) = who else { return Ok(None) };
        let t = &self.tenants[i];
        let max = t.cfg.max_concurrency;
        let prev = t.usage.in_flight.fetch_add(1, Ordering::AcqRel);
        let slot = Slot {
            usage: t.usage.clone(),
        };
        if max > 0 && prev >= max {
            drop(slot);
            return Err(format!(
                "tenant '{}' has {max} requests in flight, its max_concurrency; retry later",
                t.cfg.name
            ));
        }
        Ok(Some(slot))
    }
}

/// The tenants file a server runs with: reloaded on SIGHUP and `POST /admin/reload`. Each
/// request holds the registry it was identified by until it ends, so a reload drops nothing
/// in flight; keys the new file lacks stop working for the next request.
pub struct Tenancy {
    pub path: std::path::PathBuf,
    current: std::sync::RwLock<std::sync::Arc<Registry>>,
}

impl std::fmt::Debug for Tenancy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tenancy({}, {:?})", self.path.display(), self.current())
    }
}

impl Tenancy {
    pub fn load(path: &std::path::Path) -> Result<Tenancy, String> {
        let t = Tenants::load(path)?;
        Ok(Tenancy {
            path: path.to_path_buf(),
            current: std::sync::RwLock::new(std::sync::Arc::new(Registry::new(t))),
        })
    }

    pub fn current(&self) -> std::sync::Arc<Registry> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Read the file again; on an error (naming the line and field) the old tenants stay.
    /// The number of tenants now.
    pub fn reload(&self) -> Result<usize, String> {
        let t = Tenants::load(&self.path)?;
        let mut g = self.current.write().unwrap_or_else(|e| e.into_inner());
        let next = g.reloaded(t);
        let n = next.len();
        *g = std::sync::Arc::new(next);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_are_sha256_hex() {
        // sha256("secret"), as `printf secret | sha256sum` prints it
        assert_eq!(
            hash_key("secret"),
            "2bb80d537b1da3e38bd30361aa855686bde0eacd7162fef6a25fe97bf527a25b"
        );
    }

    #[test]
    fn a_good_file_and_its_defaults() {
        let h1 = hash_key("a");
        let h2 = hash_key("b");
        let text = format!(
            "[admin]\nkey_sha256 = [\"{}\"]\n[[tenant]]\nname = \"acme\"\nkey_sha256 = [\"{h1}\"]\nweight = 2.5\nrpm = 600\n\n[[tenant]]\nname = \"lab-2\"\nkey_sha256 = [\"{}\"]\n",
            hash_key("root"),
            h2.to_uppercase()
        );
        let t = Tenants::parse(&text, "t.toml").unwrap();
        assert_eq!(t.admin_keys, vec![hash_key("root")]);
        assert_eq!(t.tenants[0].weight, 2.5);
        assert_eq!(t.tenants[0].rpm, 600);
        assert_eq!(t.tenants[1].weight, 1.0);
        assert_eq!(t.tenants[1].key_sha256, vec![h2]);
        assert!(!t.tenants[1].share_prefix_cache);
    }

    fn registry(extra: &str) -> Registry {
        let text = format!(
            "[admin]\nkey_sha256 = [\"{}\"]\n[[tenant]]\nname = \"acme\"\nkey_sha256 = [\"{}\"]\n{extra}",
            hash_key("root"),
            hash_key("k")
        );
        Registry::new(Tenants::parse(&text, "t.toml").unwrap())
    }

    #[test]
    fn tpm_takes_up_front_and_settles_what_was_used() {
        let r = registry("tpm = 100\n");
        let who = r.identify("k").unwrap();
        assert!(matches!(
            r.take_tokens(who, 101),
            Err(TokensRefused::Never(m)) if m.contains("tpm")
        ));
        let (mut a, info) = r.take_tokens(who, 60).unwrap().unwrap();
        assert_eq!((info.limit, info.remaining), (100, 40));
        assert!(matches!(
            r.take_tokens(who, 50),
            Err(TokensRefused::Later(_))
        ));
        // it used 20 of the 60 taken: 40 come back
        a.settle(20);
        a.settle(0); // once only
        let (_, info) = r.take_tokens(who, 50).unwrap().unwrap();
        assert_eq!(info.remaining, 30);
        let h = info.headers();
        assert_eq!(h[0], ("x-ratelimit-limit-tokens", "100".to_string()));
        // no tpm, no limit; the admin has none
        assert!(r.take_tokens(Who::Admin, 1 << 40).unwrap().is_none());
    }

    #[test]
    fn a_reload_keeps_what_a_tenant_of_the_same_name_counted() {
        let r = registry("max_concurrency = 1\nrpm = 2\n");
        let who = r.identify("k").unwrap();
        let _slot = r.acquire(who).unwrap();
        r.take_request(who).unwrap();
        let text = format!(
            "[[tenant]]\nname = \"acme\"\nkey_sha256 = [\"{}\"]\nmax_concurrency = 1\nrpm = 2\n",
            hash_key("k2")
        );
        let r2 = r.reloaded(Tenants::parse(&text, "t.toml").unwrap());
        assert!(r2.identify("k").is_none(), "the old key is gone");
        let who2 = r2.identify("k2").unwrap();
        assert!(
            r2.acquire(who2).is_err(),
            "its request in flight still counts"
        );
        assert_eq!(r2.take_request(who2).unwrap().unwrap().remaining, 0);
        assert!(r2.identify("root").is_none());
    }

    #[test]
    fn shares_carry_weight_and_bounded_priority() {
        let r = registry("weight = 3.0\nmax_priority = -2\n");
        let who = r.identify("k").unwrap();
        assert!(r.share(who, -3).is_err());
        let s = r.share(who, -2).unwrap();
        assert_eq!((&*s.tenant, s.weight, s.priority), ("acme", 3.0, -2));
        assert_eq!(&*r.share(Who::Admin, -1000).unwrap().tenant, "admin");
        assert_ne!(request_salt(5, Some("x")), request_salt(5, Some("y")));
        assert_ne!(request_salt(5, Some("x")), request_salt(7, Some("x")));
        assert_eq!(request_salt(5, None), 5);
    }
}
