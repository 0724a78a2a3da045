//! Compiles `layout_probe.c` against the real header so the `layout` test
//! can compare the C compiler's layout with this crate's `#[repr(C)]` types.

fn main() {
    let include = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../include");
    println!("cargo:rerun-if-changed=layout_probe.c");
    println!(
        "cargo:rerun-if-changed={}",
        include.join("etl_plugin.h").display()
    );
    cc::Build::new()
        .file("layout_probe.c")
        .include(&include)
        .std("c11")
        .warnings_into_errors(true)
        .compile("etl_abi_layout_probe");
}
