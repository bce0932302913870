//! Prometheus metrics: counters fed by the end of each outgoing migration job, and a
//! plain HTTP/1.1 endpoint (`GET /metrics`, text exposition format 0.0.4) on
//! `metrics_listen`. Every connection gets one answer and is closed; malformed
//! requests get a 400 naming the problem and never touch the daemon's state.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use super::jobs::{Job, MODES};
use super::state::st;
use super::Daemon;

/// Upper bounds of the downtime histogram's buckets, seconds.
pub const DOWNTIME_BUCKETS: [f64; 10] =
    [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0];
const OUTCOMES: [&str; 3] = ["completed", "failed", "cancelled"];
/// States always exported (0 when no VM is in them), so that every series exists.
/// `adopting`: found at the daemon's start, its process not answering yet.
const STATES: [&str; 10] = [
    st::CREATING,
    st::RUNNING,
    st::PAUSED,
    st::INCOMING,
    st::MIGRATED,
    st::STOPPED,
    st::DESTROYING,
    st::SAVING,
    st::UNCONFIRMED,
    ADOPTING,
];
/// The state a VM has in the metrics while its process does not answer the
/// daemon that found it at its start (not yet a VM of the registry).
const ADOPTING: &str = "adopting";
/// Longest request head accepted.
const MAX_REQUEST: usize = 8192;
/// Time a client has to send its request head.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once; more wait in the kernel's backlog.
const MAX_CONNECTIONS: usize = 32;

/// Counters since the daemon started.
#[derive(Default)]
pub struct Metrics {
    inner: Mutex<Counters>,
}

#[derive(Default)]
struct Counters {
    /// (outcome, mode) -> migrations.
    migrations: BTreeMap<(String, String), u64>,
    bytes: u64,
    downtime_buckets: [u64; DOWNTIME_BUCKETS.len()],
    downtime_sum: f64,
    downtime_count: u64,
}

impl Metrics {
    /// Counts a job that has just ended: its outcome, the bytes it put on the wire
    /// and, when it completed, its downtime.
    pub fn migration_ended(&self, job: &Job) {
        let mut c = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        *c.migrations
            .entry((job.status.clone(), job.opts.mode.clone()))
            .or_default() += 1;
        if let Some(b) = job.stats["bytes"].as_u64() {
            c.bytes = c.bytes.saturating_add(b);
        }
        let downtime = job.stats["downtime_ms"]
            .as_f64()
            .filter(|ms| ms.is_finite() && *ms >= 0.0);
        if let (true, Some(ms)) = (job.status == "completed", downtime) {
            let s = ms / 1000.0;
            for (i, le) in DOWNTIME_BUCKETS.iter().enumerate() {
                if s <= *le {
                    c.downtime_buckets[i] += 1;
                }
            }
            c.downtime_sum += s;
            c.downtime_count += 1;
        }
    }

    /// The exposition text, with `vms` the number of VMs in each state and
    /// `memory` the guest RAM of the VMs that run here: (given, used), bytes.
    pub fn render(&self, vms: &BTreeMap<String, u64>, memory: (u64, u64)) -> String {
        let mut out = String::new();
        let o = &mut out;
        family(o, "migd_build_info", "gauge", "Version of this migd.");
        let _ = writeln!(
            o,
            "migd_build_info{{version=\"{}\"}} 1",
            escape(env!("CARGO_PKG_VERSION"))
        );

        family(
            o,
            "migd_vms",
            "gauge",
            "VMs known to this daemon, by state.",
        );
        let mut states: BTreeMap<&str, u64> = STATES.iter().map(|s| (*s, 0)).collect();
        for (s, n) in vms {
            *states.entry(s).or_default() += n;
        }
        for (s, n) in states {
            let _ = writeln!(o, "migd_vms{{state=\"{}\"}} {n}", escape(s));
        }

        family(
            o,
            "migd_guest_memory_bytes",
            "gauge",
            "Guest RAM given to the VMs whose process runs here.",
        );
        let _ = writeln!(o, "migd_guest_memory_bytes {}", memory.0);
        family(
            o,
            "migd_guest_memory_used_bytes",
            "gauge",
            "Host memory their guest RAM takes: pages written; never-touched and zero pages left as holes take none.",
        );
        let _ = writeln!(o, "migd_guest_memory_used_bytes {}", memory.1);

        let c = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        family(
            o,
            "migd_migrations_total",
            "counter",
            "Outgoing migrations ended since the daemon started, by outcome and mode.",
        );
        let mut migrations: BTreeMap<(String, String), u64> = OUTCOMES
            .iter()
            .flat_map(|out| MODES.iter().map(|m| ((out.to_string(), m.to_string()), 0)))
            .collect();
        for (k, n) in &c.migrations {
            *migrations.entry(k.clone()).or_default() += n;
        }
        for ((outcome, mode), n) in migrations {
            let _ = writeln!(
                o,
                "migd_migrations_total{{outcome=\"{}\",mode=\"{}\"}} {n}",
                escape(&outcome),
                escape(&mode)
            );
        }

        family(
            o,
            "migd_migration_bytes_total",
            "counter",
            "Bytes put on the wire by outgoing migrations, counted when each ends.",
        );
        let _ = writeln!(o, "migd_migration_bytes_total {}", c.bytes);

        family(
            o,
            "migd_migration_downtime_seconds",
            "histogram",
            "Guest pause (source pause to destination confirmation) of completed outgoing migrations.",
        );
        for (le, n) in DOWNTIME_BUCKETS.iter().zip(c.downtime_buckets) {
            let _ = writeln!(
                o,
                "migd_migration_downtime_seconds_bucket{{le=\"{le}\"}} {n}"
            );
        }
        let count = c.downtime_count;
        let _ = writeln!(
            o,
            "migd_migration_downtime_seconds_bucket{{le=\"+Inf\"}} {count}"
        );
        let _ = writeln!(o, "migd_migration_downtime_seconds_sum {}", c.downtime_sum);
        let _ = writeln!(o, "migd_migration_downtime_seconds_count {count}");
        out
    }
}

fn family(o: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// A label value as the exposition format wants it.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Binds the endpoint's address (at start, so that a taken port stops the daemon).
pub async fn bind(addr: &str) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics listener {addr}"))
}

/// Serves `/metrics` on `listener` until the daemon exits.
pub fn serve(d: Arc<Daemon>, listener: TcpListener) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    tokio::spawn(async move {
        loop {
            let Ok(permit) = slots.clone().acquire_owned().await else {
                return;
            };
            match listener.accept().await {
                Ok((conn, peer)) => {
                    let d = d.clone();
                    tokio::spawn(async move {
                        serve_conn(&d, conn, peer).await;
                        drop(permit);
                    });
                }
                Err(e) => {
                    tracing::warn!("metrics listener: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
}

async fn serve_conn(d: &Daemon, mut conn: TcpStream, peer: std::net::SocketAddr) {
    let reply = match tokio::time::timeout(READ_TIMEOUT, read_head(&mut conn)).await {
        Ok(Ok(head)) => respond(d, &head, peer),
        Ok(Err(why)) => {
            tracing::warn!(%peer, "metrics: bad request: {why}");
            Reply::error(400, "Bad Request", &why)
        }
        Err(_) => {
            tracing::debug!(%peer, "metrics: no request within {READ_TIMEOUT:?}");
            Reply::error(408, "Request Timeout", "no request in time")
        }
    };
    let _ = tokio::time::timeout(READ_TIMEOUT, async {
        conn.write_all(&reply.bytes()).await?;
        conn.shutdown().await?;
        // Lingering close: read what the client still sends (a refused request's
        // rest) until it closes, so that closing does not reset the connection and
        // destroy the answer before the client has read it.
        let mut sink = [0u8; 4096];
        let mut left = 1 << 16;
        while left > 0 {
            match conn.read(&mut sink).await? {
                0 => break,
                n => left -= n.min(left),
            }
        }
        std::io::Result::Ok(())
    })
    .await;
}

/// Reads up to the blank line that ends a request head.
async fn read_head(conn: &mut TcpStream) -> std::result::Result<Vec<u8>, String> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    loop {
        let n = conn
            .read(&mut buf)
            .await
            .map_err(|e| format!("reading the request: {e}"))?;
        if n == 0 {
            return Err("connection closed before the end of the request head".into());
        }
        head.extend_from_slice(&buf[..n]);
        if head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n") {
            return Ok(head);
        }
        if head.len() > MAX_REQUEST {
            return Err(format!("request head longer than {MAX_REQUEST} bytes"));
        }
    }
}

/// The answer to one request head.
fn respond(d: &Daemon, head: &[u8], peer: std::net::SocketAddr) -> Reply {
    let (method, path) = match parse_request_line(head) {
        Ok(r) => r,
        Err(why) => {
            tracing::warn!(%peer, "metrics: bad request: {why}");
            return Reply::error(400, "Bad Request", &why);
        }
    };
    let path = path.split_once('?').map_or(path, |(p, _)| p);
    if path != "/metrics" {
        tracing::debug!(method, path, "metrics: not found");
        return Reply::error(404, "Not Found", "only /metrics is served here");
    }
    if method != "GET" && method != "HEAD" {
        tracing::debug!(method, "metrics: method not allowed");
        let mut r = Reply::error(405, "Method Not Allowed", "use GET");
        r.extra = "Allow: GET, HEAD\r\n";
        return r;
    }
    let mut vms: BTreeMap<String, u64> = BTreeMap::new();
    let mut memory = (0, 0);
    let reg = d.reg();
    for v in reg.vms.values() {
        *vms.entry(v.state.clone()).or_default() += 1;
        if v.pid.is_some() {
            memory.0 += v.record.memory;
            memory.1 += v.memory_used.unwrap_or(0);
        }
    }
    if !reg.adopting.is_empty() {
        vms.insert(ADOPTING.into(), reg.adopting.len() as u64);
    }
    drop(reg);
    Reply {
        status: 200,
        reason: "OK",
        content_type: "text/plain; version=0.0.4; charset=utf-8",
        extra: "",
        body: d.metrics.render(&vms, memory).into_bytes(),
        head_only: method == "HEAD",
    }
}

/// `METHOD SP PATH SP HTTP/1.x` from the first line of `head`.
fn parse_request_line(head: &[u8]) -> std::result::Result<(&str, &str), String> {
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let line = std::str::from_utf8(line).map_err(|_| "request line is not UTF-8".to_string())?;
    let mut parts = line.split(' ');
    let (Some(method), Some(path), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(format!(
            "request line '{}' is not 'METHOD PATH HTTP/1.1'",
            line.chars().take(80).collect::<String>().escape_debug()
        ));
    };
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(format!("bad method '{}'", method.escape_debug()));
    }
    if !path.starts_with('/') {
        return Err(format!("bad path '{}'", path.escape_debug()));
    }
    if !matches!(version, "HTTP/1.0" | "HTTP/1.1") {
        return Err(format!(
            "unsupported protocol '{}' (want HTTP/1.0 or HTTP/1.1)",
            version.escape_debug()
        ));
    }
    Ok((method, path))
}

struct Reply {
    status: u16,
    reason: &'static str,
    content_type: &'static str,
    extra: &'static str,
    body: Vec<u8>,
    head_only: bool,
}

impl Reply {
    fn error(status: u16, reason: &'static str, why: &str) -> Reply {
        Reply {
            status,
            reason,
            content_type: "text/plain; charset=utf-8",
            extra: "",
            body: format!("{status} {reason}: {why}\n").into_bytes(),
            head_only: false,
        }
    }

    fn bytes(&self) -> Vec<u8> {
        let mut out = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n{}Connection: close\r\n\r\n",
            self.status,
            self.reason,
            self.content_type,
            self.body.len(),
            self.extra
        )
        .into_bytes();
        if !self.head_only {
            out.extend_from_slice(&self.body);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn job(status: &str, mode: &str, stats: serde_json::Value) -> Job {
        serde_json::from_value(json!({
            "id": "job1", "vm": "v", "to": "h:1", "mode": mode, "max_downtime_ms": 300,
            "max_bandwidth": null, "status": status, "started": 0, "ended": 1,
            "error": null, "stats": stats,
        }))
        .expect("job")
    }

    #[test]
    fn render_counts_and_histogram() {
        let m = Metrics::default();
        let empty = m.render(&BTreeMap::new(), (0, 0));
        assert!(empty.contains("migd_vms{state=\"running\"} 0\n"), "{empty}");
        // The state operators alert on exists before any VM is in it.
        assert!(
            empty.contains("migd_vms{state=\"unconfirmed\"} 0\n"),
            "{empty}"
        );
        assert!(
            empty.contains("migd_vms{state=\"adopting\"} 0\n"),
            "{empty}"
        );
        assert!(empty.contains("migd_migrations_total{outcome=\"failed\",mode=\"postcopy\"} 0\n"));
        assert!(empty.contains("migd_migration_downtime_seconds_count 0\n"));
        m.migration_ended(&job(
            "completed",
            "precopy",
            json!({"bytes": 1000, "downtime_ms": 20.0}),
        ));
        m.migration_ended(&job("failed", "pre\"copy", json!({"bytes": 5})));
        let vms = BTreeMap::from([("running".to_string(), 2), ("odd".to_string(), 1)]);
        let t = m.render(&vms, (3 << 30, 5 << 20));
        for want in [
            "migd_vms{state=\"running\"} 2\n",
            "migd_vms{state=\"odd\"} 1\n",
            "migd_guest_memory_bytes 3221225472\n",
            "migd_guest_memory_used_bytes 5242880\n",
            "migd_migrations_total{outcome=\"completed\",mode=\"precopy\"} 1\n",
            "migd_migrations_total{outcome=\"failed\",mode=\"pre\\\"copy\"} 1\n",
            "migd_migration_bytes_total 1005\n",
            "migd_migration_downtime_seconds_bucket{le=\"0.01\"} 0\n",
            "migd_migration_downtime_seconds_bucket{le=\"0.025\"} 1\n",
            "migd_migration_downtime_seconds_bucket{le=\"+Inf\"} 1\n",
            "migd_migration_downtime_seconds_sum 0.02\n",
            "migd_migration_downtime_seconds_count 1\n",
            "# TYPE migd_migration_downtime_seconds histogram\n",
        ] {
            assert!(t.contains(want), "no '{want}' in:\n{t}");
        }
    }

    #[test]
    fn request_lines() {
        assert_eq!(
            parse_request_line(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Ok(("GET", "/metrics"))
        );
        assert_eq!(
            parse_request_line(b"HEAD /metrics?x=1 HTTP/1.0\n\n"),
            Ok(("HEAD", "/metrics?x=1"))
        );
        for bad in [
            &b""[..],
            b"\r\n\r\n",
            b"GET\r\n\r\n",
            b"GET /metrics\r\n\r\n",
            b"GET /metrics HTTP/2\r\n\r\n",
            b"get /metrics HTTP/1.1\r\n\r\n",
            b"GET metrics HTTP/1.1\r\n\r\n",
            b"GET  /metrics HTTP/1.1\r\n\r\n",
            b"\xff\xfe / HTTP/1.1\r\n\r\n",
        ] {
            assert!(parse_request_line(bad).is_err(), "{bad:?}");
        }
    }
}
