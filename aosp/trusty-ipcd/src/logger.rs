//! A small `log` backend: one line per record on stderr, with the level and a timestamp.

use std::io::Write;
use std::time::{SystemTime, UNIX_EPOCH};

use log::{LevelFilter, Log, Metadata, Record};

struct StderrLogger {
    tag: &'static str,
}

impl Log for StderrLogger {
    fn enabled(&self, m: &Metadata) -> bool {
        m.level() <= log::max_level()
    }

    fn log(&self, r: &Record) {
        if !self.enabled(r.metadata()) {
            return;
        }
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let line = format!(
            "{}.{:03} {} {}: {}\n",
            t.as_secs(),
            t.subsec_millis(),
            r.level(),
            self.tag,
            r.args()
        );
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }

    fn flush(&self) {}
}

/// Installs the logger (once; later calls only change the level). `verbose`: 0 = info,
/// 1 = debug, 2+ = trace; the environment variable `TRUSTY_IPCD_LOG` (error, warn, info,
/// debug, trace, off) overrides it.
pub fn init(tag: &'static str, verbose: u8) {
    let mut level = match verbose {
        0 => LevelFilter::Info,
        1 => LevelFilter::Debug,
        _ => LevelFilter::Trace,
    };
    if let Ok(v) = std::env::var("TRUSTY_IPCD_LOG") {
        if let Ok(l) = v.parse::<LevelFilter>() {
            level = l;
        }
    }
    let logger: &'static StderrLogger = Box::leak(Box::new(StderrLogger { tag }));
    let _ = log::set_logger(logger);
    log::set_max_level(level);
}
