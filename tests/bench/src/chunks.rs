//! Which chunks of an echo series count, and the series' ratio to its own reference.
//!
//! The bench's machine is a VM whose host moves the two vCPUs between near and far physical
//! cores within seconds (the cache-line round trip reads 69 ns on one placement, 325 ns on
//! another). A reference measured once per run then says nothing about the placement an echo
//! series ran on. So each series is measured in chunks, each bracketed by a short cache-line
//! round trip just before and just after it; a chunk whose two references disagree saw the
//! placement change and is dropped. This is the arithmetic of that choice, apart from the
//! threads that take the measurements, so that it can be tested.

/// One chunk of an echo series: its p50 and the cache-line round trips just before and after.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Chunk {
    pub p50_ns: f64,
    pub ref_before_ns: f64,
    pub ref_after_ns: f64,
}

impl Chunk {
    /// The chunk's reference: the mean of the round trips before and after it.
    pub fn ref_ns(&self) -> f64 {
        (self.ref_before_ns + self.ref_after_ns) / 2.0
    }

    /// Whether the references before and after agree ([`references_agree`]) and the chunk
    /// has a p50.
    pub fn steady(&self, tolerance: f64) -> bool {
        measured(self.p50_ns) && references_agree(self.ref_before_ns, self.ref_after_ns, tolerance)
    }
}

fn measured(x: f64) -> bool {
    x.is_finite() && x > 0.0
}

/// Whether two references taken around one measurement agree, so that it ran on one placement:
/// the larger at most `1 + tolerance` times the smaller. A non-positive or non-finite reference
/// (a failed measurement) never agrees.
pub fn references_agree(before_ns: f64, after_ns: f64, tolerance: f64) -> bool {
    let (a, b) = (before_ns, after_ns);
    measured(a) && measured(b) && a.max(b) <= a.min(b) * (1.0 + tolerance)
}

/// What a series' chunks give.
#[derive(Clone, Debug, PartialEq)]
pub struct Selection {
    /// Per chunk, in order: kept (its references agree) or dropped.
    pub kept: Vec<bool>,
    /// The median over the kept chunks of p50 / reference; over all chunks if none was kept
    /// (then `stable` is false); NaN if there are no chunks.
    pub ratio: f64,
    /// The median over the same chunks of their references (ns).
    pub ref_ns: f64,
    /// At least half of the chunks were kept.
    pub stable: bool,
}

impl Selection {
    pub fn chunks_kept(&self) -> usize {
        self.kept.iter().filter(|&&k| k).count()
    }
}

/// Keeps the chunks whose references before and after agree within `tolerance` (0.25: the larger
/// at most 25% above the smaller); the series is stable if at least half of its chunks were kept.
pub fn select(chunks: &[Chunk], tolerance: f64) -> Selection {
    let kept: Vec<bool> = chunks.iter().map(|c| c.steady(tolerance)).collect();
    let n_kept = kept.iter().filter(|&&k| k).count();
    let stable = !chunks.is_empty() && 2 * n_kept >= chunks.len();
    // With no chunk kept the figures come from all of them, flagged unstable: a number with a
    // mark says more than none.
    let used: Vec<&Chunk> = chunks.iter().zip(&kept).filter(|&(_, &k)| k || n_kept == 0).map(|(c, _)| c).collect();
    let mut ratios: Vec<f64> = used.iter().map(|c| c.p50_ns / c.ref_ns()).collect();
    let mut refs: Vec<f64> = used.iter().map(|c| c.ref_ns()).collect();
    Selection { ratio: median(&mut ratios), ref_ns: median(&mut refs), stable, kept }
}

/// The median (the mean of the two middle values for an even count); NaN for none.
pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(p50_ns: f64, ref_before_ns: f64, ref_after_ns: f64) -> Chunk {
        Chunk { p50_ns, ref_before_ns, ref_after_ns }
    }

    #[test]
    fn median_odd_even_empty() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(&mut []).is_nan());
    }

    #[test]
    fn steady_within_tolerance_only() {
        assert!(c(500.0, 100.0, 125.0).steady(0.25));
        assert!(c(500.0, 125.0, 100.0).steady(0.25));
        assert!(!c(500.0, 100.0, 126.0).steady(0.25));
        assert!(!c(500.0, 69.0, 325.0).steady(0.25));
        assert!(!c(f64::NAN, 100.0, 100.0).steady(0.25), "a chunk without a p50");
        assert!(references_agree(100.0, 125.0, 0.25) && !references_agree(100.0, 126.0, 0.25));
        assert!(!references_agree(0.0, 0.0, 0.25) && !references_agree(f64::NAN, 100.0, 0.25));
        assert!(!c(500.0, 0.0, 0.0).steady(0.25));
        assert!(!c(500.0, f64::NAN, 70.0).steady(0.25));
        assert!(!c(f64::NAN, 70.0, 70.0).steady(0.25));
    }

    #[test]
    fn drops_chunks_whose_placement_changed() {
        // Eight chunks; the fourth and seventh saw the placement flip (69 <-> 325 ns); chunks 5
        // and 6 ran entirely on the far placement and count with their own reference.
        let chunks = [
            c(545.0, 69.0, 70.0),
            c(550.0, 70.0, 71.0),
            c(540.0, 71.0, 69.0),
            c(900.0, 69.0, 325.0),
            c(1600.0, 325.0, 320.0),
            c(1620.0, 320.0, 330.0),
            c(1000.0, 330.0, 70.0),
            c(548.0, 70.0, 70.0),
        ];
        let s = select(&chunks, 0.25);
        assert_eq!(s.kept, [true, true, true, false, true, true, false, true]);
        assert_eq!(s.chunks_kept(), 6);
        assert!(s.stable);
        let mut ratios = [545.0 / 69.5, 550.0 / 70.5, 540.0 / 70.0, 1600.0 / 322.5, 1620.0 / 325.0, 548.0 / 70.0];
        assert_eq!(s.ratio, median(&mut ratios));
        assert!((s.ratio - (540.0 / 70.0 + 550.0 / 70.5) / 2.0).abs() < 1e-12);
        assert_eq!(s.ref_ns, (70.0 + 70.5) / 2.0);
        // Kept, the chunks that saw the flip (900 / 197 = 4.6x, 1000 / 200 = 5.0x) would pull the
        // median down to 6.4x.
        let all = select(&chunks, 10.0);
        assert_eq!(all.chunks_kept(), 8);
        assert!((all.ratio - (1000.0 / 200.0 + 540.0 / 70.0) / 2.0).abs() < 1e-12);
    }

    #[test]
    fn half_kept_is_stable_fewer_is_not() {
        let good = c(700.0, 100.0, 100.0);
        let bad = c(700.0, 100.0, 300.0);
        let s = select(&[good, bad, good, bad], 0.25);
        assert!(s.stable);
        assert_eq!(s.chunks_kept(), 2);
        assert_eq!(s.ratio, 7.0);
        let s = select(&[good, bad, bad, bad], 0.25);
        assert!(!s.stable);
        assert_eq!(s.kept, [true, false, false, false]);
        // Unstable, but the figures still come from the chunk that was kept.
        assert_eq!(s.ratio, 7.0);
        assert_eq!(s.ref_ns, 100.0);
    }

    #[test]
    fn none_kept_falls_back_to_all_chunks_unstable() {
        let s = select(&[c(600.0, 100.0, 200.0), c(900.0, 200.0, 100.0), c(1200.0, 100.0, 300.0)], 0.25);
        assert_eq!(s.chunks_kept(), 0);
        assert!(!s.stable);
        assert_eq!(s.ratio, 6.0);
        assert_eq!(s.ref_ns, 150.0);
        let s = select(&[], 0.25);
        assert!(!s.stable);
        assert!(s.ratio.is_nan());
    }
}
