//! C's `pow`, provided here so that the process does not load libm at all.
//!
//! The binary's only calls to libm are to `pow` (what `f64::powf` becomes):
//! tokio's multi-threaded scheduler calls it to tune how often a worker
//! looks at the global queue, and the metrics call it once at startup to
//! lay out the histogram's buckets. Loading libm for that costs about half
//! a MiB of resident memory: the dynamic loader touches its symbol tables,
//! and the kernel maps the pages around every page touched. `build.rs`
//! links with `--wrap=pow`, which sends the binary's calls to `pow` here;
//! with no call left for libm to satisfy, and `--as-needed` linking, libm
//! is not recorded as needed. A plugin that calls `pow` still gets its own
//! libm's: the binary defines no symbol named `pow`.
//!
//! The implementation is the `libm` crate's, a port of musl's.

/// What the binary's calls to C's `double pow(double, double)` reach.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[no_mangle]
pub extern "C" fn __wrap_pow(x: f64, y: f64) -> f64 {
    libm::pow(x, y)
}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    #[test]
    fn exact_powers_come_out_exact() {
        // Cases whose results are exactly representable, so any correct
        // pow returns exactly these (f64::powf is not a reference here: in
        // this binary it calls the function under test).
        for (x, y, want) in [
            (2.0, 10.0, 1024.0),
            (0.5, 3.0, 0.125),
            (9.0, 0.5, 3.0),
            (1.5, 0.0, 1.0),
            (4.0, -1.0, 0.25),
            (0.0, 2.0, 0.0),
        ] {
            assert_eq!(super::__wrap_pow(x, y), want, "{x}^{y}");
        }
        assert!(super::__wrap_pow(-1.0, 0.5).is_nan());
    }
}
