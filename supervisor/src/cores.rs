//! Client connections on a runtime of their own: one thread per core,
//! each gathering its log lines ([`log_lines`]) and handing them out before
//! it sleeps. The accept loop and everything else stay on the main runtime.
//!
//! The threads steal work from each other. One single-threaded runtime per
//! core (as nginx's worker processes) served about 6 % more manifest hits
//! under `wrk` on 2 cores, but a connection waited whenever its thread did:
//! where the cache shares its cores (with the clients, or a node's other
//! work), the scheduler takes a thread away for up to a tick (4 ms), and
//! p99 read 3.3-4.2 ms against 1.3-2.6 ms stealing (nginx 0.4-4.1; bench/README).

use std::future::Future;
use std::time::Duration;

use tokio::runtime::Runtime;

use crate::log_lines;

/// The connection runtime; dropping it stops it (and what still runs on
/// it) and waits for its threads, whose last lines are written then.
pub struct Cores {
    runtime: Option<Runtime>,
}

impl Cores {
    /// As many threads as available cores.
    pub fn start() -> std::io::Result<Cores> {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n)
            .thread_name("regcache-conn")
            .enable_all()
            // Parking is where a connection thread sleeps (blocking-pool
            // threads never park, so they never gather).
            .on_thread_park(|| {
                log_lines::gather();
                log_lines::flush();
            })
            .on_thread_stop(log_lines::flush)
            .build()?;
        Ok(Cores {
            runtime: Some(runtime),
        })
    }

    /// Runs `task` on the connection threads.
    pub fn spawn<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        if let Some(rt) = &self.runtime {
            rt.spawn(task);
        }
    }
}

impl Drop for Cores {
    fn drop(&mut self) {
        // A runtime cannot be shut down, and waited for, from within
        // another's task: from a thread of its own, then.
        if let Some(rt) = self.runtime.take() {
            // A file read still running must not hold the stop up.
            let stop = std::thread::spawn(move || rt.shutdown_timeout(Duration::from_secs(1)));
            let _ = stop.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::oneshot;

    #[test]
    fn tasks_run_on_the_connection_threads_and_stop_with_them() {
        let cores = Cores::start().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        for _ in 0..4 {
            let tx = tx.clone();
            cores.spawn(async move {
                let name = std::thread::current().name().unwrap_or("").to_string();
                tx.send(name).unwrap();
            });
        }
        for _ in 0..4 {
            assert_eq!(rx.recv().unwrap(), "regcache-conn");
        }
        // A task still pending when the runtime stops is dropped, not leaked.
        let (held, dropped) = oneshot::channel::<()>();
        cores.spawn(async move {
            let _held = held;
            std::future::pending::<()>().await
        });
        drop(cores);
        assert!(
            dropped.blocking_recv().is_err(),
            "the pending task was dropped"
        );
    }
}
