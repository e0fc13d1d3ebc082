//! The echo floor: what a 16-byte echo between the two cores costs when it moves the same cache
//! lines as one of ours (mailbox word, tx buffer, avail ring, rx buffer, used rings) and does
//! nothing else. A machine reference like the cache-line round trip: it says how much of an
//! echo the line transfers alone take on this placement, so that the rest can be read as the
//! two sides' instructions.
//!
//! Each side writes the lines a TIPC echo has it write, in the order it writes them, and
//! publishes them with the word the other side polls; the other side, once that word moves,
//! asks for every line it is about to read at once (as the stack's scan and the peers do) and
//! then reads them in their dependency order (an index, then the slot or entry it names, then
//! the buffer). The lines, each alone in its 128-byte pair (see [`CacheLine`]):
//! - the mailbox line: the request and response sequence words share it, as in the host
//!   mailbox (`trusty_platform::mailbox`, offsets 4 and 8);
//! - the request: the tx buffer's first line (header and 16 bytes), the avail slot and the avail
//!   index (a slot past the first thirty lies on another line than the index);
//! - the answer: the rx buffer's first line, the rx ring's used entry and index, and the tx
//!   ring's used entry and index (only the first seven entries share the index's line).

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Instant;

use trusty_virtio::vring::prefetch_line;

/// One cache line of words, alone in its 128-byte pair: the adjacent-line prefetcher fetches
/// lines in pairs, and two of these in one pair would move together (a floor must not pay
/// for that).
#[repr(C, align(128))]
#[derive(Default)]
struct CacheLine([AtomicU32; 16]);

impl CacheLine {
    fn at(&self, i: usize) -> &AtomicU32 {
        &self.0[i % 16]
    }
    fn prefetch(&self) {
        prefetch_line(self.0.as_ptr().cast());
    }
}

/// Word of the mailbox line the caller writes (the request sequence number) and the one the
/// server writes (the response's).
const REQ: usize = 1;
const RSP: usize = 2;

#[derive(Default)]
struct Lines {
    mailbox: CacheLine,
    tx_buf: CacheLine,
    avail_slot: CacheLine,
    avail_idx: CacheLine,
    rx_buf: CacheLine,
    rx_used_entry: CacheLine,
    rx_used_idx: CacheLine,
    tx_used_entry: CacheLine,
    tx_used_idx: CacheLine,
    stop: CacheLine,
}

/// Serves echoes until told to stop: on each new request, the request's lines asked for
/// together, read in order, and the answer's lines written before its word.
fn serve(l: &Lines, stopped: &AtomicBool) {
    let mut served = 0u32;
    loop {
        let req = l.mailbox.at(REQ).load(Ordering::Acquire);
        if req == served {
            if l.stop.at(0).load(Ordering::Relaxed) != 0 {
                stopped.store(true, Ordering::Release);
                return;
            }
            std::hint::spin_loop();
            continue;
        }
        l.avail_idx.prefetch();
        l.avail_slot.prefetch();
        l.tx_buf.prefetch();
        let idx = l.avail_idx.at(0).load(Ordering::Acquire);
        let head = l.avail_slot.at(idx as usize).load(Ordering::Relaxed);
        let (a, b) = (l.tx_buf.at(head as usize).load(Ordering::Relaxed), l.tx_buf.at(head as usize + 1).load(Ordering::Relaxed));
        l.rx_buf.at(0).store(a, Ordering::Relaxed);
        l.rx_buf.at(1).store(b, Ordering::Relaxed);
        l.rx_used_entry.at(idx as usize).store(idx, Ordering::Relaxed);
        l.rx_used_idx.at(0).store(idx, Ordering::Release);
        l.tx_used_entry.at(idx as usize).store(head, Ordering::Relaxed);
        l.tx_used_idx.at(0).store(idx, Ordering::Release);
        l.mailbox.at(RSP).store(req, Ordering::Release);
        served = req;
    }
}

/// One echo from the caller's side: request `seq` written and published, the answer awaited
/// (at most 5 s) and its lines read. Returns what it read, so that no read can be dropped.
/// Each read after an index reads the word the index names, so it waits for the index.
#[inline(always)]
fn echo(l: &Lines, seq: u32) -> Result<u32, String> {
    l.tx_buf.at(0).store(seq, Ordering::Relaxed);
    l.tx_buf.at(1).store(seq, Ordering::Relaxed);
    l.avail_slot.at(seq as usize).store(0, Ordering::Relaxed);
    l.avail_idx.at(0).store(seq, Ordering::Release);
    l.mailbox.at(REQ).store(seq, Ordering::Release);
    if !crate::spin_until(|| l.mailbox.at(RSP).load(Ordering::Acquire) == seq, std::hint::spin_loop, 5) {
        return Err("echo floor: the thread on the last core did not answer in 5 s".into());
    }
    l.rx_used_idx.prefetch();
    l.rx_used_entry.prefetch();
    l.rx_buf.prefetch();
    l.tx_used_idx.prefetch();
    l.tx_used_entry.prefetch();
    let rx = l.rx_used_idx.at(0).load(Ordering::Acquire);
    let entry = l.rx_used_entry.at(rx as usize).load(Ordering::Relaxed);
    let data = l.rx_buf.at(entry as usize).load(Ordering::Relaxed);
    let tx = l.tx_used_idx.at(0).load(Ordering::Acquire);
    Ok(data.wrapping_add(l.tx_used_entry.at(tx as usize).load(Ordering::Relaxed)))
}

/// Mean ns per floor echo: the median of `batches` batches of `per_batch` echoes, with a thread
/// on the last core serving them (`move_to_last_core`; the caller should be on core 0). Needs
/// two CPUs (with one, the two spinning sides would take turns at the scheduler's tick).
pub fn echo_floor_ns(batches: usize, per_batch: u32) -> Result<f64, String> {
    if trusty_model::host::cpu_count() < 2 {
        return Err("echo floor: needs two CPUs".into());
    }
    let lines = Arc::new(Lines::default());
    let stopped = Arc::new(AtomicBool::new(false));
    let (l, s) = (lines.clone(), stopped.clone());
    let thread = std::thread::Builder::new()
        .name("echo-floor".into())
        .spawn(move || {
            trusty_model::host::move_to_last_core();
            serve(&l, &s);
        })
        .map_err(|e| format!("spawn the echo floor's thread: {e}"))?;
    let mut seq = 0u32;
    let mut sink = 0u32;
    let mut means = Vec::with_capacity(batches);
    let deadline = Instant::now() + std::time::Duration::from_secs(5);
    for _ in 0..batches.max(1) {
        let start = Instant::now();
        for _ in 0..per_batch.max(1) {
            seq = seq.wrapping_add(1).max(1);
            match echo(&lines, seq) {
                Ok(v) => sink = sink.wrapping_add(v),
                Err(e) => {
                    lines.stop.at(0).store(1, Ordering::Relaxed);
                    return Err(e);
                }
            }
        }
        means.push(start.elapsed().as_nanos() as f64 / f64::from(per_batch.max(1)));
        if Instant::now() > deadline {
            break;
        }
    }
    std::hint::black_box(sink);
    lines.stop.at(0).store(1, Ordering::Relaxed);
    let _ = thread.join();
    if !stopped.load(Ordering::Acquire) {
        return Err("echo floor: the serving thread did not stop".into());
    }
    means.sort_by(|a, b| a.total_cmp(b));
    Ok(means[means.len() / 2])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every echo of the floor is answered (each request's own sequence number comes back,
    /// else the caller would wait out its 5 s bound and fail), the serving thread stops when
    /// told, and the figure is a time; with one CPU it is refused instead of crawling.
    #[test]
    fn the_floor_echoes_every_request_and_stops() {
        match trusty_model::host::cpu_count() {
            1 => assert!(echo_floor_ns(2, 100).is_err()),
            _ => {
                let ns = echo_floor_ns(3, 2_000).expect("the floor runs");
                assert!(ns.is_finite() && ns > 0.0, "{ns}");
            }
        }
    }
}
