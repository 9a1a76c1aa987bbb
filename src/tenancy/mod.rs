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
//! requests in flight. Not built yet (issue 20): fair share in the scheduler, rpm/tpm, the
//! usage ledger, reload.

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

struct TenantState {
    /// requests-per-minute bucket: (tokens, when they were counted)
    bucket: std::sync::Mutex<(f64, std::time::Instant)>,
    cfg: Tenant,
    /// prefix-cache key: 0 (the shared pool) when the tenant shares, else its own
    salt: u64,
    in_flight: std::sync::atomic::AtomicU64,
}

/// The tenants a server runs with: key lookup, prefix-cache salts, concurrency slots.
pub struct Registry {
    tenants: Vec<TenantState>,
    by_key: HashMap<String, Who>,
}

/// A tenant's request-rate budget after one request, for OpenAI's `x-ratelimit-*` headers.
#[derive(Debug, Clone, PartialEq)]
pub struct RateInfo {
    pub limit: u64,
    pub remaining: u64,
    /// seconds until the budget is full again
    pub reset_secs: f64,
    /// whole seconds until one more request fits (Retry-After)
    pub next_secs: u64,
    pub tenant: String,
}

impl RateInfo {
    /// `x-ratelimit-limit-requests`, `-remaining-requests`, `-reset-requests`.
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        vec![
            ("x-ratelimit-limit-requests", self.limit.to_string()),
            ("x-ratelimit-remaining-requests", self.remaining.to_string()),
            (
                "x-ratelimit-reset-requests",
                format!("{:.3}s", self.reset_secs),
            ),
        ]
    }
}

/// One request's hold on its tenant's concurrency (released when dropped).
pub struct Slot {
    reg: std::sync::Arc<Registry>,
    i: usize,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.reg.tenants[self.i]
            .in_flight
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// A prefix-cache salt of its own for `name` (never 0, the shared pool's).
fn salt_of(name: &str) -> u64 {
    let d = Sha256::digest(format!("kojo-tenant:{name}").as_bytes());
    u64::from_le_bytes(d[..8].try_into().unwrap()) | 1
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.tenants.iter().map(|t| t.cfg.name.as_str()).collect();
        write!(f, "Registry {{ tenants: {names:?} }}")
    }
}

impl Registry {
    pub fn new(t: Tenants) -> Registry {
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
                TenantState {
                    bucket: std::sync::Mutex::new((cfg.rpm as f64, std::time::Instant::now())),
                    salt: if cfg.share_prefix_cache {
                        0
                    } else {
                        salt_of(&cfg.name)
                    },
                    cfg,
                    in_flight: Default::default(),
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

    /// The prefix-cache key of `who`'s requests.
    pub fn cache_salt(&self, who: Who) -> u64 {
        match who {
            Who::Admin => salt_of("\0admin"),
            Who::Tenant(i) => self.tenants[i].salt,
        }
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
        let mut b = t.bucket.lock().unwrap_or_else(|e| e.into_inner());
        let now = std::time::Instant::now();
        let rate = limit as f64 / 60.0;
        b.0 = (b.0 + now.duration_since(b.1).as_secs_f64() * rate).min(limit as f64);
        b.1 = now;
        let ok = b.0 >= 1.0;
        if ok {
            b.0 -= 1.0;
        }
        let info = RateInfo {
            limit,
            remaining: b.0.floor() as u64,
            reset_secs: (limit as f64 - b.0) / rate,
            next_secs: ((1.0 - b.0).max(0.0) / rate).ceil().max(1.0) as u64,
            tenant: t.cfg.name.clone(),
        };
        if ok {
            Ok(Some(info))
        } else {
            Err(info)
        }
    }

    /// A slot for one more request of `who` in flight; `Err` (for a 429) when its tenant's
    /// `max_concurrency` are already running or waiting.
    pub fn acquire(self: &std::sync::Arc<Self>, who: Who) -> Result<Option<Slot>, String> {
        use std::sync::atomic::Ordering;
        let Who::Tenant(i) = who else { return Ok(None) };
        let t = &self.tenants[i];
        let max = t.cfg.max_concurrency;
        let prev = t.in_flight.fetch_add(1, Ordering::AcqRel);
        let slot = Slot {
            reg: self.clone(),
            i,
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
}
