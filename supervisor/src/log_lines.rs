//! The log writer: every line on standard error, in batches on the
//! connection threads, in one of two formats (text or JSON).
//!
//! A `write` per access-log line was a tenth of a manifest hit's cost, and
//! the stderr lock one more hand-over between threads. A connection thread
//! ([`crate::cores`]) instead gathers its lines and writes them at once
//! before it sleeps, or when [`LIMIT`] bytes are waiting; an idle cache
//! therefore logs each request as it ends, and a busy one a few milliseconds
//! later. Lines gathered are lost only if the process is killed outright.
//! Every other thread writes each line as it comes.
//!
//! Most lines are `tracing` events. The access log, one line per request, is
//! written by [`info`] instead: the same line, but without `tracing`'s field
//! visitors and formatting machinery, which took 7 % of the front's CPU time
//! serving manifest hits under `wrk` (1.6 % by hand).

use std::cell::RefCell;
use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use tracing_subscriber::fmt::MakeWriter;

/// Bytes gathered before they are written anyway (a hundred lines or so).
pub const LIMIT: usize = 16 << 10;

thread_local! {
    static GATHERED: RefCell<Option<Vec<u8>>> = const { RefCell::new(None) };
}

/// Lines are JSON objects (`REGISTRY_LOG_FORMATTER=json`), not text.
static JSON: AtomicBool = AtomicBool::new(false);

/// Sets up logging for this process: `RUST_LOG` (or registry:2's
/// `REGISTRY_LOG_LEVEL`) filters; JSON lines with
/// `REGISTRY_LOG_FORMATTER=json`.
pub fn init() {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .or_else(|| std::env::var("REGISTRY_LOG_LEVEL").ok())
        .unwrap_or_else(|| "info".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(Stderr);
    if std::env::var("REGISTRY_LOG_FORMATTER").is_ok_and(|f| f.eq_ignore_ascii_case("json")) {
        JSON.store(true, Ordering::Relaxed);
        builder.json().init();
    } else {
        builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init();
    }
}

/// A field's value in a line [`info`] writes.
pub enum Value<'a> {
    /// Text: bare in a text line (it must hold no spaces), a string in JSON.
    Text(&'a str),
    Number(u64),
    /// Milliseconds, to the microsecond.
    Millis(Duration),
    Bool(bool),
}

/// Writes an INFO line of `target` with `fields`, as `tracing`'s formatter
/// would have (uncoloured). The caller checks that the target is enabled.
pub fn info(target: &str, fields: &[(&str, Value<'_>)]) {
    let now = SystemTime::now();
    let json = JSON.load(Ordering::Relaxed);
    write_line(|out| format_line(out, now, json, target, fields));
}

/// Formats with appends rather than `write!`, whose machinery was half
/// the cost of a line.
fn format_line(
    out: &mut Vec<u8>,
    now: SystemTime,
    json: bool,
    target: &str,
    fields: &[(&str, Value<'_>)],
) {
    fn put(out: &mut Vec<u8>, parts: &[&str]) {
        parts
            .iter()
            .for_each(|p| out.extend_from_slice(p.as_bytes()));
    }
    // Written in place: a `String` of it first was one allocation a line.
    let stamp = humantime::format_rfc3339_micros(now);
    if json {
        put(out, &[r#"{"timestamp":""#]);
        let _ = write!(out, "{stamp}");
        put(out, &[r#"","level":"INFO","fields":{"#]);
    } else {
        let _ = write!(out, "{stamp}");
        put(out, &["  INFO ", target, ":"]);
    }
    for (i, (name, value)) in fields.iter().enumerate() {
        match (json, i) {
            (false, _) => put(out, &[" ", name, "="]),
            (true, 0) => put(out, &["\"", name, "\":"]),
            (true, _) => put(out, &[",\"", name, "\":"]),
        }
        value.write(out, json);
    }
    if json {
        put(out, &[r#"},"target":""#, target, r#""}"#]);
    }
    out.push(b'\n');
}

impl Value<'_> {
    fn write(&self, out: &mut Vec<u8>, json: bool) {
        // serde_json writes integers without `fmt`.
        let mut number = |n: u64| {
            let _ = serde_json::to_writer(&mut *out, &n);
        };
        match *self {
            Value::Text(t) if json => {
                let _ = serde_json::to_writer(&mut *out, t);
            }
            Value::Text(t) => out.extend_from_slice(t.as_bytes()),
            Value::Number(n) => number(n),
            Value::Millis(d) => {
                let us = d.as_micros() as u64;
                number(us / 1000);
                let frac = us % 1000;
                let digit = |d: u64| b'0' + (d % 10) as u8;
                out.extend_from_slice(&[b'.', digit(frac / 100), digit(frac / 10), digit(frac)]);
            }
            Value::Bool(b) => out.extend_from_slice(if b { b"true" } else { b"false" }),
        }
    }
}

/// Writes one line, built by `build`, straight into this thread's gathered
/// lines when it gathers them.
fn write_line(build: impl FnOnce(&mut Vec<u8>)) {
    GATHERED.with(|g| match g.borrow_mut().as_mut() {
        Some(buf) => add(buf, build, &mut io::stderr()),
        None => {
            let mut line = Vec::with_capacity(256);
            build(&mut line);
            write_out(&mut line, &mut io::stderr());
        }
    });
}

/// Makes this thread gather its lines from now on, written at [`flush`];
/// lines it gathered already stay.
pub fn gather() {
    GATHERED.with(|g| {
        g.borrow_mut()
            .get_or_insert_with(|| Vec::with_capacity(LIMIT));
    });
}

/// Writes the lines this thread gathered.
pub fn flush() {
    GATHERED.with(|g| {
        if let Some(buf) = g.borrow_mut().as_mut() {
            write_out(buf, &mut io::stderr());
        }
    });
}

/// Adds what `build` writes to the gathered `buf`, written to `out` at the
/// limit.
fn add(buf: &mut Vec<u8>, build: impl FnOnce(&mut Vec<u8>), out: &mut impl Write) {
    build(buf);
    if buf.len() >= LIMIT {
        write_out(buf, out);
    }
}

fn write_out(buf: &mut Vec<u8>, out: &mut impl Write) {
    if !buf.is_empty() {
        // Nowhere to report a failed log write; the lines are dropped.
        let _ = out.write_all(buf);
        buf.clear();
    }
}

/// The [`MakeWriter`] of every log line.
#[derive(Clone, Copy, Default)]
pub struct Stderr;

impl<'a> MakeWriter<'a> for Stderr {
    type Writer = Stderr;

    fn make_writer(&'a self) -> Stderr {
        Stderr
    }
}

impl Write for Stderr {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        write_line(|out| out.extend_from_slice(data));
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gathered_lines_go_out_whole_at_the_limit() {
        let (mut buf, mut out) = (Vec::new(), Vec::new());
        let put = |data: &'static [u8]| move |b: &mut Vec<u8>| b.extend_from_slice(data);
        add(&mut buf, put(b"one line\n"), &mut out);
        assert!(out.is_empty(), "held");
        let line = &[b'x'; 1000];
        while out.is_empty() {
            add(&mut buf, put(line), &mut out);
        }
        assert!(buf.is_empty());
        assert!(out.len() >= LIMIT && out.starts_with(b"one line\nxxx"));
        write_out(&mut buf, &mut out);
        assert!(out.len() < LIMIT + line.len(), "nothing more to write");
    }

    /// Writes to a shared buffer, as tracing's formatter's writer.
    #[derive(Clone, Default)]
    struct Capture(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl Write for Capture {
        fn write(&mut self, data: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(data);
            Ok(data.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// The same line written by `info`'s formatting and by `tracing`'s,
    /// split into its timestamp and the rest.
    fn both_lines(json: bool) -> [(String, String); 2] {
        let capture = Capture::default();
        let writer = {
            let c = capture.clone();
            move || c.clone()
        };
        let builder = tracing_subscriber::fmt()
            .with_writer(writer)
            .with_ansi(false);
        let event = || {
            tracing::info!(target: "access", method = %"GET", path = %"/v2/a\"b?n=1",
                bytes = 70_000u64, duration_ms = 2.5, complete = false)
        };
        if json {
            tracing::subscriber::with_default(builder.json().finish(), event);
        } else {
            tracing::subscriber::with_default(builder.finish(), event);
        }
        let mut ours = Vec::new();
        let fields = [
            ("method", Value::Text("GET")),
            ("path", Value::Text("/v2/a\"b?n=1")),
            ("bytes", Value::Number(70_000)),
            ("duration_ms", Value::Millis(Duration::from_micros(2500))),
            ("complete", Value::Bool(false)),
        ];
        format_line(&mut ours, SystemTime::now(), json, "access", &fields);
        let theirs = capture.0.lock().unwrap().clone();
        [ours, theirs].map(|line| {
            let line = String::from_utf8(line).unwrap();
            assert!(
                line.ends_with('\n') && line.matches('\n').count() == 1,
                "{line:?}"
            );
            if json {
                let mut v: serde_json::Value = serde_json::from_str(&line).unwrap();
                let ts = v.as_object_mut().unwrap().remove("timestamp").unwrap();
                (ts.as_str().unwrap().to_owned(), v.to_string())
            } else {
                let (ts, rest) = line.split_once(' ').unwrap();
                // Their 2.5 is our 2.500.
                (
                    ts.to_owned(),
                    rest.replace("duration_ms=2.5 ", "duration_ms=2.500 "),
                )
            }
        })
    }

    #[test]
    fn lines_read_as_tracing_writes_them() {
        for json in [false, true] {
            let [(our_time, ours), (their_time, theirs)] = both_lines(json);
            assert_eq!(ours, theirs, "json: {json}");
            assert_eq!(
                our_time.len(),
                their_time.len(),
                "{our_time} / {their_time}"
            );
            humantime::parse_rfc3339(&our_time).unwrap();
        }
    }

    #[test]
    fn only_threads_that_gather_hold_lines() {
        std::thread::spawn(|| {
            let held = || GATHERED.with(|g| g.borrow().as_ref().map(Vec::len));
            Stderr.write_all(b"").unwrap();
            assert_eq!(held(), None);
            gather();
            Stderr.write_all(b"").unwrap();
            assert_eq!(held(), Some(0));
        })
        .join()
        .unwrap();
    }
}
