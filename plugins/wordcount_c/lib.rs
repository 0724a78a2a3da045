//! `wordcount_c` is a C plugin: `build.rs` compiles `wordcount.c` into
//! `libwordcount_c.so`. This empty crate only gives cargo a package to build,
//! so that `cargo build --workspace` produces the C plugin too.
