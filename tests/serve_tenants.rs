//! `kojo serve --tenants FILE` on SmolLM2: keys identify tenants (unknown keys are 401), each
//! tenant's prefix-cache blocks are its own unless it shares (and the request's `cache_salt`
//! separates further), max_concurrency holds under a burst (429 with Retry-After past it), rpm
//! and tpm answer 429 with OpenAI's headers (a request past the whole tpm is a 400), `priority`
//! is bounded by max_priority, and SIGHUP or POST /admin/reload reload the file without
//! dropping a request in flight.

mod common;

use common::server::*;
use serde_json::{json, Value};
use std::io::Read;

fn post(s: &Server, key: &str, body: &Value) -> (u16, Value) {
    match ureq::post(&s.url("/v1/chat/completions"))
        .set("Authorization", &format!("Bearer {key}"))
        .send_json(body.clone())
    {
        Ok(r) => (r.status(), r.into_json().unwrap()),
        Err(ureq::Error::Status(code, r)) => (code, r.into_json().unwrap_or(Value::Null)),
        Err(e) => panic!("{e}"),
    }
}

fn server(dir: &tempfile::TempDir) -> Server {
    let h = kojo::tenancy::hash_key;
    let file = format!(
        "[admin]\nkey_sha256 = [\"{}\"]\n\n\
         [[tenant]]\nname = \"a\"\nkey_sha256 = [\"{}\"]\n\n\
         [[tenant]]\nname = \"b\"\nkey_sha256 = [\"{}\"]\n\n\
         [[tenant]]\nname = \"s1\"\nkey_sha256 = [\"{}\"]\nshare_prefix_cache = true\n\n\
         [[tenant]]\nname = \"s2\"\nkey_sha256 = [\"{}\"]\nshare_prefix_cache = true\n\n\
         [[tenant]]\nname = \"small\"\nkey_sha256 = [\"{}\"]\nmax_concurrency = 2\n\n\
         [[tenant]]\nname = \"rl\"\nkey_sha256 = [\"{}\"]\nrpm = 3\n\n\
         [[tenant]]\nname = \"tp\"\nkey_sha256 = [\"{}\"]\ntpm = 250\n\n\
         [[tenant]]\nname = \"lo\"\nkey_sha256 = [\"{}\"]\nmax_priority = 0\n",
        h("root"),
        h("key-a"),
        h("key-b"),
        h("key-s1"),
        h("key-s2"),
        h("key-small"),
        h("key-rl"),
        h("key-tp"),
        h("key-lo")
    );
    let path = dir.path().join("tenants.toml");
    std::fs::write(&path, file).unwrap();
    Server::start(&["--tenants", path.to_str().unwrap()])
}

#[test]
fn keys_identify_tenants_and_prefix_caches_are_theirs() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(&dir);
    let long = "Tell me about the history of tea in Japan. ".repeat(12);
    let body = json!({"model": MODEL_ID, "messages": [{"role": "user", "content": long}], "max_tokens": 2, "temperature": 0});
    let cached = |key: &str| {
        let (code, v) = post(&s, key, &body);
        assert_eq!(code, 200, "{v}");
        v["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap()
    };
    let (code, v) = post(&s, "not-a-key", &body);
    assert_eq!(
        (code, v["error"]["code"].as_str()),
        (401, Some("invalid_api_key")),
        "{v}"
    );
    let (code, _) = post(&s, "", &body);
    assert_eq!(code, 401);
    assert_eq!(cached("key-a"), 0);
    assert!(cached("key-a") > 0, "a's repeat hits its own cache");
    assert_eq!(cached("key-b"), 0, "b must not hit a's blocks");
    assert_eq!(cached("root"), 0, "the admin has its own cache too");
    assert_eq!(cached("key-s1"), 0);
    assert!(cached("key-s2") > 0, "two sharing tenants share");
    // the request's own cache_salt: the same salt hits, another does not
    let salted = |salt: &str| {
        let mut b = body.clone();
        b["cache_salt"] = json!(salt);
        let (code, v) = post(&s, "key-a", &b);
        assert_eq!(code, 200, "{v}");
        v["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(
        salted("x"),
        0,
        "a salt of its own misses the tenant's blocks"
    );
    assert!(salted("x") > 0, "the same salt hits");
    assert_eq!(salted("y"), 0);
    // /health stays open
    assert_eq!(ureq::get(&s.url("/health")).call().unwrap().status(), 200);
}

#[test]
fn max_concurrency_holds_under_a_burst() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(&dir);
    let port = s.port;
    let body =
        json!({"model": MODEL_ID, "messages": [{"role": "user", "content": "Write a long story."}],
                      "max_tokens": 64, "temperature": 0, "ignore_eos": true, "stream": true})
        .to_string();
    // 6 streams at once: 2 run, 4 get 429 at once
    let conns: Vec<_> = (0..6)
        .map(|_| {
            let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
            use std::io::Write;
            write!(c, "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer key-small\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).unwrap();
            c
        })
        .collect();
    let mut codes = Vec::new();
    for mut c in conns {
        let mut head = [0u8; 12];
        c.read_exact(&mut head).unwrap();
        let code: u16 = String::from_utf8_lossy(&head[9..12]).parse().unwrap();
        let mut rest = String::new();
        let _ = c.read_to_string(&mut rest);
        if code == 429 {
            assert!(rest.to_ascii_lowercase().contains("retry-after"), "{rest}");
            assert!(rest.contains("max_concurrency"), "{rest}");
        }
        codes.push(code);
    }
    assert_eq!(codes.iter().filter(|&&c| c == 200).count(), 2, "{codes:?}");
    assert_eq!(codes.iter().filter(|&&c| c == 429).count(), 4, "{codes:?}");
    // the slots came back: the tenant can run again, and other tenants were never limited
    let one = json!({"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2});
    assert_eq!(post(&s, "key-small", &one).0, 200);
    assert_eq!(post(&s, "key-a", &one).0, 200);
}

/// rpm: a bucket of `rpm` requests refilled per minute; every answer carries OpenAI's
/// `x-ratelimit-*-requests` headers, and the request past the budget is a 429 with Retry-After.
#[test]
fn rpm_limits_answer_429_with_openai_headers() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(&dir);
    let body = json!({"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1});
    let send = || match ureq::post(&s.url("/v1/chat/completions"))
        .set("Authorization", "Bearer key-rl")
        .send_json(body.clone())
    {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("{e}"),
    };
    for left in [2, 1, 0] {
        let r = send();
        assert_eq!(r.status(), 200);
        assert_eq!(r.header("x-ratelimit-limit-requests"), Some("3"));
        assert_eq!(
            r.header("x-ratelimit-remaining-requests"),
            Some(left.to_string().as_str())
        );
        assert!(r
            .header("x-ratelimit-reset-requests")
            .unwrap()
            .ends_with('s'));
    }
    let r = send();
    assert_eq!(r.status(), 429);
    let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=20).contains(&retry), "{retry}");
    assert_eq!(r.header("x-ratelimit-remaining-requests"), Some("0"));
    let v: Value = r.into_json().unwrap();
    assert!(
        v["error"]["message"].as_str().unwrap().contains("rpm"),
        "{v}"
    );
    assert_eq!(v["error"]["type"], "rate_limit_error");
    // another tenant is not limited by it
    let (code, _) = post(&s, "key-a", &body);
    assert_eq!(code, 200);
}

/// tpm: the prompt plus max_tokens (when given) are taken up front, what was not used is given
/// back at the end; past the budget a 429 with the `-tokens` headers; a request that needs
/// more than the whole tpm is a 400 saying so.
#[test]
fn tpm_limits_answer_429_and_a_request_past_the_whole_tpm_is_a_400() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(&dir);
    let send = |max_tokens: usize| {
        let body = json!({"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}],
                          "max_tokens": max_tokens, "ignore_eos": true, "temperature": 0});
        match ureq::post(&s.url("/v1/chat/completions"))
            .set("Authorization", "Bearer key-tp")
            .send_json(body)
        {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("{e}"),
        }
    };
    let r = send(400);
    assert_eq!(r.status(), 400);
    let v: Value = r.into_json().unwrap();
    assert!(
        v["error"]["message"].as_str().unwrap().contains("tpm"),
        "{v}"
    );
    let r = send(80);
    assert_eq!(r.status(), 200);
    assert_eq!(r.header("x-ratelimit-limit-tokens"), Some("250"));
    let first: u64 = r
        .header("x-ratelimit-remaining-tokens")
        .unwrap()
        .parse()
        .unwrap();
    assert!(first < 250 - 80, "{first}");
    let v: Value = r.into_json().unwrap();
    let used = v["usage"]["total_tokens"].as_u64().unwrap();
    assert!(used > 80);
    let r = send(80);
    assert_eq!(r.status(), 200);
    let second: u64 = r
        .header("x-ratelimit-remaining-tokens")
        .unwrap()
        .parse()
        .unwrap();
    assert!(second < first, "{second} {first}");
    let r = send(80);
    assert_eq!(r.status(), 429);
    assert!(r.header("retry-after").is_some());
    assert_eq!(r.header("x-ratelimit-limit-tokens"), Some("250"));
    assert!(r.header("x-ratelimit-reset-tokens").unwrap().ends_with('s'));
    let v: Value = r.into_json().unwrap();
    assert!(
        v["error"]["message"].as_str().unwrap().contains("tpm"),
        "{v}"
    );
    // others are not limited by it
    let one = json!({"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2});
    assert_eq!(post(&s, "key-a", &one).0, 200);
}

#[test]
fn priority_is_bounded_by_max_priority() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(&dir);
    let body = |p: i64| {
        json!({"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}],
                               "max_tokens": 1, "priority": p})
    };
    let (code, v) = post(&s, "key-lo", &body(-1));
    assert_eq!(code, 400, "{v}");
    assert_eq!(v["error"]["param"], "priority");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("max_priority"),
        "{v}"
    );
    assert_eq!(post(&s, "key-lo", &body(0)).0, 200);
    assert_eq!(post(&s, "key-lo", &body(5)).0, 200);
    // the admin may ask for any band
    assert_eq!(post(&s, "root", &body(-100)).0, 200);
}

fn tenants_file(keys: &[(&str, &str)]) -> String {
    let mut f = format!(
        "[admin]\nkey_sha256 = [\"{}\"]\n",
        kojo::tenancy::hash_key("root")
    );
    for (name, key) in keys {
        f += &format!(
            "\n[[tenant]]\nname = \"{name}\"\nkey_sha256 = [\"{}\"]\n",
            kojo::tenancy::hash_key(key)
        );
    }
    f
}

/// Reload by POST /admin/reload and by SIGHUP: removed keys stop at once, new keys work, a
/// bad file keeps the old tenants (and the endpoint says which line), a stream in flight under
/// a removed key finishes.
#[test]
fn reloads_by_sighup_and_the_admin_endpoint_drop_nothing_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tenants.toml");
    std::fs::write(&path, tenants_file(&[("x", "key-x")])).unwrap();
    let s = Server::start(&["--tenants", path.to_str().unwrap()]);
    let one = json!({"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1});
    assert_eq!(post(&s, "key-x", &one).0, 200);
    // a long stream under key-x, read after the reload
    let body =
        json!({"model": MODEL_ID, "messages": [{"role": "user", "content": "Write a story."}],
                      "max_tokens": 96, "ignore_eos": true, "stream": true})
        .to_string();
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", s.port)).unwrap();
    {
        use std::io::Write;
        write!(stream, "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer key-x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).unwrap();
    }
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).unwrap();
    assert_eq!(&head[9..12], b"200");
    let reload = |key: &str| match ureq::post(&s.url("/admin/reload"))
        .set("Authorization", &format!("Bearer {key}"))
        .call()
    {
        Ok(r) => (r.status(), r.into_json::<Value>().unwrap()),
        Err(ureq::Error::Status(c, r)) => (c, r.into_json::<Value>().unwrap()),
        Err(e) => panic!("{e}"),
    };
    std::fs::write(&path, tenants_file(&[("y", "key-y")])).unwrap();
    assert_eq!(reload("key-x").0, 403, "only the admin reloads");
    let (code, v) = reload("root");
    assert_eq!((code, v["tenants"].as_u64()), (200, Some(1)), "{v}");
    assert_eq!(
        post(&s, "key-x", &one).0,
        401,
        "a removed key stops at once"
    );
    assert_eq!(post(&s, "key-y", &one).0, 200);
    // the stream that started under key-x ends normally
    let mut rest = String::new();
    stream.read_to_string(&mut rest).unwrap();
    assert!(rest.contains("data: [DONE]"), "{rest}");
    assert!(rest.contains("\"finish_reason\":\"length\""), "{rest}");
    // a bad file: the endpoint names the line and field, the old tenants stay
    std::fs::write(
        &path,
        format!("{}weight = -1\n", tenants_file(&[("z", "key-z")])),
    )
    .unwrap();
    let (code, v) = reload("root");
    assert_eq!(code, 400, "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("tenants.toml") && msg.contains("weight"),
        "{msg}"
    );
    assert_eq!(post(&s, "key-y", &one).0, 200);
    // SIGHUP
    std::fs::write(&path, tenants_file(&[("z", "key-z")])).unwrap();
    unsafe {
        libc::kill(s.child.id() as i32, libc::SIGHUP);
    }
    let t = std::time::Instant::now();
    while post(&s, "key-z", &one).0 != 200 {
        assert!(t.elapsed().as_secs() < 10, "SIGHUP did not reload");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(post(&s, "key-y", &one).0, 401);
}
