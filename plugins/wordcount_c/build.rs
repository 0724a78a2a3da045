//! Builds `libwordcount_c.so` from `wordcount.c` with the C compiler the `cc`
//! crate finds (CC, else the platform's `cc`), linked with Jansson
//! (`-ljansson`; Debian: libjansson-dev, which `scripts/setup` installs),
//! and puts it beside the Rust plugins in the target profile directory
//! (`target/release/` for `cargo build --release`), since cargo itself only
//! links Rust libraries.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let include = here.join("../../include");
    let source = here.join("wordcount.c");
    println!("cargo:rerun-if-changed={}", source.display());
    println!(
        "cargo:rerun-if-changed={}",
        include.join("etl_plugin.h").display()
    );

    // OUT_DIR is <target>/<profile>/build/<pkg>-<hash>/out.
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let profile_dir = out_dir
        .ancestors()
        .nth(3)
        .expect("OUT_DIR lies under the target profile directory");
    let library = profile_dir.join(format!(
        "{}wordcount_c{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    ));

    let compiler = cc::Build::new()
        .pic(true)
        .std("c11")
        .warnings(true)
        .extra_warnings(true)
        .get_compiler();
    let mut cmd: Command = compiler.to_command();
    cmd.arg("-shared")
        .arg("-fvisibility=hidden") // only ETL_PLUGIN_EXPORT symbols are exported
        .arg("-Werror")
        .arg("-I")
        .arg(&include)
        .arg(&source)
        .arg("-ljansson")
        .arg("-o")
        .arg(&library);
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("cannot run the C compiler {:?}: {e}", compiler.path()));
    assert!(
        status.success(),
        "the C compiler failed to build {} (it needs Jansson's header and library: \
         run scripts/setup, or install Debian's libjansson-dev)",
        library.display()
    );
}
