//! Link options for the etl-serve binary that keep its resident memory low
//! (docs/benchmarks.md measures it). Both are link-time only; the code is
//! the same without them.
//!
//! - `-z pack-relative-relocs` stores the binary's relative relocations
//!   (about 26,000 of them, mostly vtable and string pointers) in the
//!   compact RELR form. The dynamic loader reads every relocation at
//!   startup, so the classic form kept about 600 KiB of the file resident.
//!   Needs glibc 2.36 or later at run time (Debian 12, the image's base);
//!   linkers that do not know the option ignore it with a warning.
//! - `--wrap=pow` sends the binary's calls to `pow`, the only libm
//!   function it uses, to `__wrap_pow` in `src/no_libm.rs`, so libm is not
//!   loaded at all (see there).

fn main() {
    let target = std::env::var("TARGET").unwrap_or_default();
    if target.contains("linux") && target.contains("gnu") {
        println!("cargo::rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
        println!("cargo::rustc-link-arg-bins=-Wl,--wrap=pow");
    }
    println!("cargo::rerun-if-changed=build.rs");
}
