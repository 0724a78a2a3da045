//! The one libm function the binary calls, provided here so that the
//! process does not load libm at all.
//!
//! tokio's multi-threaded scheduler calls `f64::powf` (C `pow`) to tune how
//! often a worker looks at the global queue. That call is the binary's only
//! use of libm, and loading libm for it costs about half a MiB of resident
//! memory: the dynamic loader touches its symbol tables, and the kernel maps
//! the pages around every page touched. `build.rs` links with
//! `--wrap=pow`, which sends the binary's calls to `pow` here; with no call
//! left for libm to satisfy, and `--as-needed` linking, libm is not
//! recorded as needed. A plugin that calls `pow` still gets its own libm's:
//! the binary defines no symbol named `pow`.
//!
//! The implementation is the `libm` crate's, a port of musl's, except for
//! small integer exponents: tokio's call raises a constant to the number of
//! tasks a worker just polled, a few times per request, and repeated
//! squaring does that in a handful of multiplications (to within a few
//! units in the last place, which an average of poll times does not feel).

/// What the binary's calls to C's `double pow(double, double)` reach.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[no_mangle]
pub extern "C" fn __wrap_pow(x: f64, y: f64) -> f64 {
    if y.fract() == 0.0 && y.abs() <= 64.0 {
        let mut n = y.abs() as u32;
        let (mut base, mut result) = (x, 1.0);
        while n > 0 {
            if n & 1 == 1 {
                result *= base;
            }
            base *= base;
            n >>= 1;
        }
        return if y < 0.0 { 1.0 / result } else { result };
    }
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

    #[test]
    fn integer_exponents_agree_with_libm() {
        for x in [0.9, 0.5, 1.5, -2.5, 1e-3, 7.0, 0.0, -0.0] {
            for n in -64..=64 {
                let (got, want) = (
                    super::__wrap_pow(x, f64::from(n)),
                    libm::pow(x, f64::from(n)),
                );
                let close = got == want || ((got - want) / want).abs() < 1e-14;
                assert!(close, "{x}^{n}: {got} against {want}");
            }
        }
        assert_eq!(super::__wrap_pow(f64::NAN, 0.0), 1.0);
        assert_eq!(super::__wrap_pow(0.0, -1.0), f64::INFINITY);
        assert_eq!(super::__wrap_pow(-0.0, -3.0), f64::NEG_INFINITY);
    }
}
