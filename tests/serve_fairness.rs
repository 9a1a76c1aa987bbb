//! Fair share, live on SmolLM2 with the batch saturated (`--max-num-seqs 4`, so requests really
//! queue): tenant A keeps 16 long requests in flight, tenant B sends short requests one at a
//! time. With `--tenants` (the virtual token counter) B's median time to first token is at
//! most half of what the same binary gives without (one first-come-first-served queue, where B
//! waits behind A's backlog).

mod common;

use common::server::*;
use serde_json::json;
use std::io::{BufRead, BufReader};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// B's median TTFT (seconds) over `rounds` requests, with A's 16 streams going.
fn b_median_ttft(s: &Server, key_a: &str, key_b: &str, rounds: usize) -> f64 {
    let stop = Arc::new(AtomicBool::new(false));
    let url = s.url("/v1/chat/completions");
    let flood: Vec<_> = (0..16)
        .map(|_| {
            let (stop, url, key) = (stop.clone(), url.clone(), key_a.to_string());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let body = json!({"model": MODEL_ID, "messages": [{"role": "user", "content": "Write a long story about a ship."}],
                                      "max_tokens": 40, "ignore_eos": true, "temperature": 0});
                    let r = ureq::post(&url)
                        .set("Authorization", &format!("Bearer {key}"))
                        .send_json(body);
                    assert!(r.is_ok(), "{r:?}");
                }
            })
        })
        .collect();
    // let A's backlog build: 4 running, 12 waiting
    let t = Instant::now();
    while s.metric("vllm:num_requests_waiting") < 10.0 {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "A's backlog did not build"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut ttfts = Vec::new();
    for i in 0..rounds {
        let body = json!({"model": MODEL_ID, "messages": [{"role": "user", "content": format!("Say hello {i}.")}],
                          "max_tokens": 2, "stream": true});
        let t = Instant::now();
        let r = ureq::post(&url)
            .set("Authorization", &format!("Bearer {key_b}"))
            .send_json(body)
            .unwrap();
        let mut first = None;
        for line in BufReader::new(r.into_reader()).lines() {
            let line = line.unwrap();
            if first.is_none()
                && line.starts_with("data: ")
                && line.contains("\"content\":\"")
                && !line.contains("\"content\":\"\"")
            {
                first = Some(t.elapsed().as_secs_f64());
            }
        }
        ttfts.push(first.unwrap_or_else(|| t.elapsed().as_secs_f64()));
    }
    stop.store(true, Ordering::Relaxed);
    for f in flood {
        f.join().unwrap();
    }
    ttfts.sort_by(f64::total_cmp);
    ttfts[ttfts.len() / 2]
}

#[test]
fn a_tenant_flooding_does_not_make_a_light_one_wait_behind_it() {
    let dir = tempfile::tempdir().unwrap();
    let h = kojo::tenancy::hash_key;
    let path = dir.path().join("tenants.toml");
    std::fs::write(
        &path,
        format!(
            "[[tenant]]\nname = \"a\"\nkey_sha256 = [\"{}\"]\n\n\
             [[tenant]]\nname = \"b\"\nkey_sha256 = [\"{}\"]\n",
            h("key-a"),
            h("key-b")
        ),
    )
    .unwrap();
    let flags = ["--max-num-seqs", "4"];
    let fcfs = {
        let s = Server::start(&flags);
        b_median_ttft(&s, "", "", 5)
    };
    let fair = {
        let mut f = flags.to_vec();
        f.extend(["--tenants", path.to_str().unwrap()]);
        let s = Server::start(&f);
        let v = b_median_ttft(&s, "key-a", "key-b", 5);
        assert!(s.metric_with("kojo:tenant_vtc", "tenant=\"a\"") > 0.0);
        v
    };
    eprintln!(
        "B's median TTFT with A's 16 long requests in flight: FCFS {:.0} ms, fair share {:.0} ms \
         (ratio {:.2})",
        fcfs * 1e3,
        fair * 1e3,
        fair / fcfs
    );
    assert!(
        fair <= 0.5 * fcfs,
        "fair share gave B {fair:.3} s, FCFS {fcfs:.3} s"
    );
}
