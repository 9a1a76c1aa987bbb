//! The usage ledger: one SQLite row per finished request, for billing.
//!
//! One writer thread owns the write connection (WAL, `synchronous=NORMAL`: a committed row
//! survives the process being killed; an OS crash may lose the last commits). Rows arrive over a
//! channel; the writer takes every row waiting and commits them in one transaction (a group
//! commit), so the cost per request falls as the request rate rises. A request's final answer
//! (the body, or the stream's last chunk with its usage) waits for its row's commit
//! ([`Ledger::record`]): a client that got its usage is in the ledger, even if the process is
//! killed the next instant. Rows of requests that ended otherwise (aborted, failed, refused)
//! are written without anyone waiting ([`Ledger::record_later`]).
//!
//! A write that fails (a full disk) is logged, counted and shown by [`Ledger::health`]; its rows
//! are kept (up to [`MAX_PENDING`]) and written with the next batch that succeeds; the engine
//! goes on. Reading ([`query`]) opens its own connection, so `kojo usage` works on the file of
//! a running server.

use rusqlite::{params, Connection, OpenFlags};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};

/// Rows kept in memory while writes fail; past this the oldest are dropped (and counted).
pub const MAX_PENDING: usize = 100_000;

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS usage (
    id TEXT NOT NULL,
    tenant TEXT NOT NULL,
    model TEXT NOT NULL,
    received_ms INTEGER NOT NULL,
    started_ms INTEGER,
    finished_ms INTEGER NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    cached_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    outcome TEXT NOT NULL,
    client_request_id TEXT
);
CREATE INDEX IF NOT EXISTS usage_finished ON usage (finished_ms);";

/// The outcomes a row may have.
pub const OUTCOMES: [&str; 5] = ["stop", "length", "abort", "error", "rejected"];

/// One finished request.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub id: String,
    pub tenant: String,
    pub model: String,
    /// milliseconds since the Unix epoch
    pub received_ms: i64,
    pub started_ms: Option<i64>,
    pub finished_ms: i64,
    pub prompt_tokens: u64,
    pub cached_tokens: u64,
    pub completion_tokens: u64,
    /// one of [`OUTCOMES`]
    pub outcome: &'static str,
    pub client_request_id: Option<String>,
}

/// Now, in milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

type Ack = tokio::sync::oneshot::Sender<Result<(), String>>;

#[derive(Default)]
struct State {
    /// the last write's error, until a write succeeds
    error: Mutex<Option<String>>,
    written: AtomicU64,
    failed_writes: AtomicU64,
    dropped: AtomicU64,
}

/// The writer's handle.
pub struct Ledger {
    pub path: PathBuf,
    tx: Mutex<Option<mpsc::Sender<(Row, Option<Ack>)>>>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    state: Arc<State>,
}

fn open_rw(path: &Path) -> Result<Connection, String> {
    let shown = path.display();
    let conn = Connection::open(path).map_err(|e| format!("{shown}: {e}"))?;
    let setup = || -> rusqlite::Result<()> {
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(rusqlite::Error::InvalidParameterName(format!(
                "journal_mode is {mode}, not wal"
            )));
        }
        conn.execute_batch("PRAGMA synchronous=NORMAL;")?;
        conn.execute_batch(SCHEMA)?;
        // the file is a ledger kojo can read and write: an integrity check, and a write
        let ok: String = conn.query_row("PRAGMA quick_check", [], |r| r.get(0))?;
        if ok != "ok" {
            return Err(rusqlite::Error::InvalidParameterName(format!(
                "integrity check: {ok}"
            )));
        }
        conn.execute_batch("BEGIN IMMEDIATE; COMMIT;")?;
        let cols: i64 = conn.query_row(
            "SELECT count(*) FROM pragma_table_info('usage') WHERE name IN \
             ('id','tenant','model','received_ms','started_ms','finished_ms','prompt_tokens',\
              'cached_tokens','completion_tokens','outcome','client_request_id')",
            [],
            |r| r.get(0),
        )?;
        if cols != 11 {
            return Err(rusqlite::Error::InvalidParameterName(
                "its `usage` table is not kojo's (columns missing)".into(),
            ));
        }
        Ok(())
    };
    setup().map_err(|e| format!("{shown}: not a usable usage ledger: {e}"))?;
    Ok(conn)
}

fn write(conn: &mut Connection, rows: &[Row]) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    {
        let mut st = tx.prepare_cached(
            "INSERT INTO usage (id, tenant, model, received_ms, started_ms, finished_ms, \
             prompt_tokens, cached_tokens, completion_tokens, outcome, client_request_id) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
        )?;
        for r in rows {
            st.execute(params![
                r.id,
                r.tenant,
                r.model,
                r.received_ms,
                r.started_ms,
                r.finished_ms,
                r.prompt_tokens as i64,
                r.cached_tokens as i64,
                r.completion_tokens as i64,
                r.outcome,
                r.client_request_id,
            ])?;
        }
    }
    tx.commit()
}

fn writer(mut conn: Connection, rx: mpsc::Receiver<(Row, Option<Ack>)>, state: Arc<State>) {
    // for the tests of what a kill loses: a slow disk (KOJO_TEST_LEDGER_DELAY_MS before each
    // commit)
    let delay = std::env::var("KOJO_TEST_LEDGER_DELAY_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map(std::time::Duration::from_millis);
    let mut pending: Vec<Row> = Vec::new();
    let mut acks: Vec<Ack> = Vec::new();
    while let Ok(first) = rx.recv() {
        let mut take = |(row, ack): (Row, Option<Ack>)| {
            pending.push(row);
            acks.extend(ack);
        };
        take(first);
        while let Ok(more) = rx.try_recv() {
            take(more);
        }
        if let Some(d) = delay {
            std::thread::sleep(d);
        }
        let result = write(&mut conn, &pending).map_err(|e| e.to_string());
        match &result {
            Ok(()) => {
                state
                    .written
                    .fetch_add(pending.len() as u64, Ordering::Relaxed);
                pending.clear();
                *state.error.lock().unwrap_or_else(|e| e.into_inner()) = None;
            }
            Err(e) => {
                tracing::error!("usage ledger: {} rows not written: {e}", pending.len());
                state.failed_writes.fetch_add(1, Ordering::Relaxed);
                *state.error.lock().unwrap_or_else(|e| e.into_inner()) = Some(e.clone());
                if pending.len() > MAX_PENDING {
                    let cut = pending.len() - MAX_PENDING;
                    pending.drain(..cut);
                    state.dropped.fetch_add(cut as u64, Ordering::Relaxed);
                }
            }
        }
        for a in acks.drain(..) {
            let _ = a.send(result.clone());
        }
    }
    if !pending.is_empty() {
        if let Err(e) = write(&mut conn, &pending) {
            tracing::error!("usage ledger: {} rows lost at exit: {e}", pending.len());
        }
    }
}

impl std::fmt::Debug for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Ledger({})", self.path.display())
    }
}

impl Ledger {
    /// Open (creating if needed) the ledger at `path` and start its writer. A file that is not
    /// a SQLite database, is corrupt, or cannot be written is an error naming it.
    pub fn open(path: &Path) -> Result<Ledger, String> {
        let conn = open_rw(path)?;
        let (tx, rx) = mpsc::channel();
        let state = Arc::new(State::default());
        let st = state.clone();
        let writer = std::thread::Builder::new()
            .name("usage-ledger".into())
            .spawn(move || writer(conn, rx, st))
            .map_err(|e| format!("usage ledger thread: {e}"))?;
        Ok(Ledger {
            path: path.to_path_buf(),
            tx: Mutex::new(Some(tx)),
            writer: Mutex::new(Some(writer)),
            state,
        })
    }

    fn send(&self, row: Row, ack: Option<Ack>) -> bool {
        let g = self.tx.lock().unwrap_or_else(|e| e.into_inner());
        g.as_ref().is_some_and(|tx| tx.send((row, ack)).is_ok())
    }

    /// Write `row` and wait for its commit.
    pub async fn record(&self, row: Row) -> Result<(), String> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if !self.send(row, Some(tx)) {
            return Err("the usage ledger is closed".into());
        }
        rx.await
            .unwrap_or_else(|_| Err("the usage ledger stopped".into()))
    }

    /// Write `row` without waiting.
    pub fn record_later(&self, row: Row) {
        if !self.send(row, None) {
            tracing::error!("usage ledger closed: a row was not written");
        }
    }

    /// `None` while writes succeed; the last write's error after one failed.
    pub fn health(&self) -> Option<String> {
        self.state
            .error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn rows_written(&self) -> u64 {
        self.state.written.load(Ordering::Relaxed)
    }

    pub fn failed_writes(&self) -> u64 {
        self.state.failed_writes.load(Ordering::Relaxed)
    }

    /// Write what is queued and stop the writer (at shutdown).
    pub fn close(&self) {
        self.tx.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(w) = self.writer.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = w.join();
        }
    }
}

impl Drop for Ledger {
    fn drop(&mut self) {
        self.close();
    }
}

/// How totals are grouped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupBy {
    Tenant,
    Day,
    Model,
}

impl std::str::FromStr for GroupBy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "tenant" => Ok(GroupBy::Tenant),
            "day" => Ok(GroupBy::Day),
            "model" => Ok(GroupBy::Model),
            _ => Err(format!("group_by must be tenant, day or model, got '{s}'")),
        }
    }
}

impl GroupBy {
    fn name(self) -> &'static str {
        match self {
            GroupBy::Tenant => "tenant",
            GroupBy::Day => "day",
            GroupBy::Model => "model",
        }
    }

    fn column(self) -> &'static str {
        match self {
            GroupBy::Tenant => "tenant",
            GroupBy::Day => "date(finished_ms / 1000, 'unixepoch')",
            GroupBy::Model => "model",
        }
    }
}

/// What to total: finished between the days `from` and `to` (UTC, inclusive), one tenant's
/// rows or all.
#[derive(Debug, Clone, PartialEq)]
pub struct Query {
    pub from: Option<String>,
    pub to: Option<String>,
    pub group_by: GroupBy,
    pub tenant: Option<String>,
}

/// A day as `YYYY-MM-DD`, checked.
pub fn check_day(param: &str, v: &str) -> Result<String, String> {
    chrono::NaiveDate::parse_from_str(v, "%Y-%m-%d")
        .map(|d| d.format("%Y-%m-%d").to_string())
        .map_err(|_| format!("`{param}` must be a date YYYY-MM-DD, got '{v}'"))
}

/// Totals of one group and outcome.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Totals {
    pub requests: u64,
    pub prompt_tokens: u64,
    pub cached_tokens: u64,
    pub completion_tokens: u64,
}

impl Totals {
    fn add(&mut self, o: &Totals) {
        self.requests += o.requests;
        self.prompt_tokens += o.prompt_tokens;
        self.cached_tokens += o.cached_tokens;
        self.completion_tokens += o.completion_tokens;
    }

    fn json(&self) -> Value {
        json!({
            "requests": self.requests,
            "prompt_tokens": self.prompt_tokens,
            "cached_prompt_tokens": self.cached_tokens,
            "completion_tokens": self.completion_tokens,
        })
    }
}

/// `(group, outcome, totals)` sorted by group then outcome, read from the ledger at `path`.
pub fn query(path: &Path, q: &Query) -> Result<Vec<(String, String, Totals)>, String> {
    let shown = path.display();
    if !path.exists() {
        return Err(format!("{shown}: no such file"));
    }
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| format!("{shown}: {e}"))?;
    let run = || -> rusqlite::Result<Vec<(String, String, Totals)>> {
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let day = "date(finished_ms / 1000, 'unixepoch')";
        let sql = format!(
            "SELECT {g}, outcome, count(*), sum(prompt_tokens), sum(cached_tokens), \
             sum(completion_tokens) FROM usage \
             WHERE (?1 IS NULL OR {day} >= ?1) AND (?2 IS NULL OR {day} <= ?2) \
             AND (?3 IS NULL OR tenant = ?3) GROUP BY 1, 2 ORDER BY 1, 2",
            g = q.group_by.column()
        );
        let mut st = conn.prepare(&sql)?;
        let rows = st.query_map(params![q.from, q.to, q.tenant], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                Totals {
                    requests: r.get::<_, i64>(2)? as u64,
                    prompt_tokens: r.get::<_, i64>(3)? as u64,
                    cached_tokens: r.get::<_, i64>(4)? as u64,
                    completion_tokens: r.get::<_, i64>(5)? as u64,
                },
            ))
        })?;
        rows.collect()
    };
    run().map_err(|e| format!("{shown}: {e}"))
}

/// The totals as `GET /v1/usage` answers: a row per group with its totals and by outcome.
pub fn to_json(q: &Query, rows: &[(String, String, Totals)]) -> Value {
    let mut data: Vec<Value> = Vec::new();
    let mut i = 0;
    while i < rows.len() {
        let key = &rows[i].0;
        let mut all = Totals::default();
        let mut by = serde_json::Map::new();
        while i < rows.len() && &rows[i].0 == key {
            all.add(&rows[i].2);
            by.insert(rows[i].1.clone(), rows[i].2.json());
            i += 1;
        }
        let mut v = all.json();
        v[q.group_by.name()] = json!(key);
        v["by_outcome"] = Value::Object(by);
        data.push(v);
    }
    json!({
        "object": "usage",
        "group_by": q.group_by.name(),
        "from": q.from,
        "to": q.to,
        "data": data,
    })
}

/// The totals as CSV: a line per group and outcome.
pub fn to_csv(q: &Query, rows: &[(String, String, Totals)]) -> String {
    let field = |s: &str| {
        if s.contains([',', '"', '\n']) {
            format!("\"{}\"", s.replace('"', "\"\""))
        } else {
            s.to_string()
        }
    };
    let mut out = format!(
        "{},outcome,requests,prompt_tokens,cached_prompt_tokens,completion_tokens\n",
        q.group_by.name()
    );
    for (k, o, t) in rows {
        out += &format!(
            "{},{},{},{},{},{}\n",
            field(k),
            field(o),
            t.requests,
            t.prompt_tokens,
            t.cached_tokens,
            t.completion_tokens
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str, tenant: &str, outcome: &'static str, day_ms: i64) -> Row {
        Row {
            id: id.into(),
            tenant: tenant.into(),
            model: "m".into(),
            received_ms: day_ms,
            started_ms: Some(day_ms + 1),
            finished_ms: day_ms + 2,
            prompt_tokens: 10,
            cached_tokens: 4,
            completion_tokens: 3,
            outcome,
            client_request_id: None,
        }
    }

    #[test]
    fn rows_commit_before_record_returns_and_totals_group() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("u.sqlite");
        let l = Ledger::open(&path).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let d1 = 1_764_633_600_000; // 2025-12-02 00:00 UTC
        let d2 = d1 + 86_400_000;
        rt.block_on(async {
            l.record(row("a", "acme", "stop", d1)).await.unwrap();
            l.record(row("b", "acme", "length", d2)).await.unwrap();
            l.record(row("c", "lab", "stop", d2)).await.unwrap();
        });
        // committed: another connection sees them
        let all = Query {
            from: None,
            to: None,
            group_by: GroupBy::Tenant,
            tenant: None,
        };
        let t = query(&path, &all).unwrap();
        assert_eq!(t.len(), 3);
        let j = to_json(&all, &t);
        assert_eq!(j["data"][0]["tenant"], "acme");
        assert_eq!(j["data"][0]["requests"], 2);
        assert_eq!(j["data"][0]["prompt_tokens"], 20);
        assert_eq!(j["data"][0]["cached_prompt_tokens"], 8);
        assert_eq!(j["data"][0]["by_outcome"]["length"]["requests"], 1);
        let days = Query {
            from: Some("2025-12-03".into()),
            group_by: GroupBy::Day,
            ..all.clone()
        };
        let t = query(&path, &days).unwrap();
        assert_eq!(to_json(&days, &t)["data"][0]["day"], "2025-12-03");
        assert_eq!(to_json(&days, &t)["data"][0]["requests"], 2);
        let lab = Query {
            tenant: Some("lab".into()),
            ..all.clone()
        };
        assert_eq!(query(&path, &lab).unwrap().len(), 1);
        assert!(to_csv(&all, &query(&path, &all).unwrap()).starts_with("tenant,outcome,"));
        l.close();
        assert_eq!(l.rows_written(), 3);
    }

    #[test]
    fn a_file_that_is_not_a_ledger_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("junk.sqlite");
        std::fs::write(&path, vec![b'x'; 4096]).unwrap();
        let e = Ledger::open(&path).err().unwrap();
        assert!(e.contains("junk.sqlite"), "{e}");
        let e = Ledger::open(&dir.path().join("no/such/dir/u.sqlite"))
            .err()
            .unwrap();
        assert!(e.contains("u.sqlite"), "{e}");
        assert!(check_day("from", "2026-13-01").is_err());
        assert_eq!(check_day("from", "2026-12-04").unwrap(), "2026-12-04");
    }
}
