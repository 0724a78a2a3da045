//! Loading a plugin library and calling its hooks.
//!
//! This is the one place that turns the C table of `include/etl_plugin.h`
//! into safe Rust: [`Plugin::load`] checks the ABI version before reading
//! anything else, copies and checks every string, and keeps the library
//! loaded for as long as the [`Plugin`] lives, so no hook can outlive it.

use std::ffi::c_void;
use std::fmt;
use std::path::{Path, PathBuf};

use etl_abi as abi;
use serde_json::Value;

use crate::invocation::{self, Invocation, PluginState};

/// What the plugin declares about itself, copied out of its table.
#[derive(Debug, Clone)]
pub struct Manifest {
    pub name: String,
    pub version: String,
    pub abi_major: u16,
    pub abi_minor: u16,
    /// `{"inputs": ..., "outputs": ...}`, as served at `/schema`.
    pub schema: Value,
    /// The explicit id, or the one derived from `schema`.
    pub id: String,
    pub capabilities: u32,
    pub streaming: bool,
    pub has_precheck: bool,
    /// What request bodies are checked against when it is not the inputs
    /// schema (see [`Manifest::request`]).
    pub request_schema: Option<Value>,
}

impl Manifest {
    /// The capability names the plugin declares, for logs and `--check`.
    /// The declared capabilities, named as the header's `ETL_CAP_*` bits
    /// and the SDK's `Capabilities` fields are.
    pub fn capability_names(&self) -> Vec<&'static str> {
        [
            (abi::CAP_USAGE, "usage"),
            (abi::CAP_MESSAGE_CHANNELS, "message_channels"),
            (abi::CAP_FILEDATA_META, "filedata_meta"),
            (abi::CAP_CANCELLATION, "cancellation"),
            (abi::CAP_SEALED_SETTINGS_V2, "sealed_settings_v2"),
        ]
        .into_iter()
        .filter(|(bit, _)| self.capabilities & bit != 0)
        .map(|(_, name)| name)
        .collect()
    }

    pub fn inputs(&self) -> &Value {
        &self.schema["inputs"]
    }

    pub fn outputs(&self) -> &Value {
        &self.schema["outputs"]
    }

    /// The schema request bodies are checked against: the inputs schema,
    /// unless the plugin described another (ABI 1.1 `request_schema`).
    pub fn request(&self) -> &Value {
        self.request_schema
            .as_ref()
            .unwrap_or_else(|| self.inputs())
    }
}

/// A loaded, initialised plugin.
pub struct Plugin {
    manifest: Manifest,
    invoke: unsafe extern "C" fn(*const abi::EtlInvokeCtx, abi::EtlStr) -> i32,
    precheck: Option<unsafe extern "C" fn(*const abi::EtlInvokeCtx) -> i32>,
    shutdown: Option<unsafe extern "C" fn()>,
    finish: Option<unsafe extern "C" fn(*mut c_void)>,
    /// What `init` stored for itself (ABI 1.1).
    state: PluginState,
    // Declared last so it is dropped last: the hooks above point into it.
    _library: libloading::Library,
}

/// What a file that is not a regular file is, for the error.
fn file_kind(meta: &std::fs::Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let t = meta.file_type();
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_char_device() || t.is_block_device() {
        "a device"
    } else {
        "not a regular file"
    }
}

/// The machine this etl-serve is built for, named as [`elf_machine`]
/// names it.
const HOST_MACHINE: &str = if cfg!(target_arch = "x86_64") {
    "x86_64"
} else if cfg!(target_arch = "aarch64") {
    "aarch64"
} else if cfg!(target_arch = "x86") {
    "x86 (32-bit)"
} else if cfg!(target_arch = "arm") {
    "arm (32-bit)"
} else {
    "this machine"
};

/// The machine an ELF file is built for, from its header; `None` when the
/// file is not ELF or cannot be read.
fn elf_machine(path: &Path) -> Option<&'static str> {
    use std::io::Read;
    let mut head = [0u8; 20];
    std::fs::File::open(path).ok()?.read_exact(&mut head).ok()?;
    if &head[..4] != b"\x7fELF" {
        return None;
    }
    // e_ident[EI_CLASS] (1: 32-bit, 2: 64-bit), e_ident[EI_DATA] (1:
    // little-endian), then e_machine at offset 18.
    let machine = if head[5] == 1 {
        u16::from_le_bytes([head[18], head[19]])
    } else {
        u16::from_be_bytes([head[18], head[19]])
    };
    Some(match (head[4], machine) {
        (2, 62) => "x86_64",
        (2, 183) => "aarch64",
        (1, 3) => "x86 (32-bit)",
        (1, 40) => "arm (32-bit)",
        (1, 62) => "x86_64 with 32-bit pointers",
        (2, 243) => "riscv64",
        (2, 21) => "ppc64",
        (2, 22) => "s390x",
        _ => "another machine",
    })
}

/// Why a plugin could not be loaded. Each message names the reason; the
/// caller adds the path.
#[derive(Debug)]
pub enum LoadError {
    /// The file does not exist or cannot be read.
    Missing(std::io::Error),
    /// A FIFO, a directory, a device: `dlopen` could block on it or
    /// fail with a misleading message.
    NotAFile(&'static str),
    /// An ELF file built for another machine than this etl-serve's.
    WrongMachine { file: String, host: &'static str },
    /// `dlopen` refused it (not a shared library, an unresolved symbol...).
    Open(libloading::Error),
    /// A library it links could not be loaded (the Python bridge without
    /// its libpython, for one).
    Dependency(libloading::Error),
    /// The library does not export `etl_plugin_entry`.
    NoEntry(libloading::Error),
    /// The entry returned NULL.
    NullTable,
    /// Built for another major version of the ABI.
    AbiMismatch {
        plugin: (u16, u16),
        host: (u16, u16),
    },
    /// The table is smaller than the 1.0 layout, or a required hook is NULL.
    BadTable(String),
    /// A string field is not UTF-8, or a schema is not JSON or not a valid
    /// JSON Schema.
    BadSchema(String),
    /// The plugin's `init` reported failure.
    Init(String),
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LoadError::Missing(e) => write!(f, "cannot read the plugin file: {e}"),
            LoadError::NotAFile(kind) => write!(f, "not a regular file: it is {kind}"),
            LoadError::WrongMachine { file, host } => write!(
                f,
                "the library is built for {file}, and this etl-serve runs on {host}; build the plugin for {host}"
            ),
            LoadError::Open(e) => write!(f, "not a loadable shared library: {e}"),
            LoadError::Dependency(e) => write!(
                f,
                "a library it links cannot be loaded (install it, or name its directory in LD_LIBRARY_PATH): {e}"
            ),
            LoadError::NoEntry(_) => write!(
                f,
                "the library does not export the entry symbol `etl_plugin_entry` (is it an etl-serve plugin?)"
            ),
            LoadError::NullTable => write!(f, "`etl_plugin_entry` returned NULL"),
            LoadError::AbiMismatch { plugin, host } => write!(
                f,
                "the plugin was built for plugin ABI {}.{} but this etl-serve speaks ABI {}.{}; rebuild the plugin against this etl-serve's include/etl_plugin.h",
                plugin.0, plugin.1, host.0, host.1
            ),
            LoadError::BadTable(why) => write!(f, "invalid plugin table: {why}"),
            LoadError::BadSchema(why) => write!(f, "invalid plugin schema: {why}"),
            LoadError::Init(why) => write!(f, "the plugin's init failed: {why}"),
        }
    }
}

impl std::error::Error for LoadError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            LoadError::Missing(e) => Some(e),
            LoadError::Open(e) | LoadError::Dependency(e) | LoadError::NoEntry(e) => Some(e),
            _ => None,
        }
    }
}

/// The smallest table the host accepts: the 1.0 layout.
const TABLE_1_0_SIZE: usize = abi::EtlPlugin::SIZE_1_0;

impl Plugin {
    /// Loads the library at `path`, checks its table, and runs its `init`
    /// with `config`.
    ///
    /// # Errors
    /// Every [`LoadError`] variant, as documented on it.
    pub fn load(path: &Path, config: &str) -> Result<Plugin, LoadError> {
        let meta = std::fs::metadata(path).map_err(LoadError::Missing)?;
        if !meta.is_file() {
            return Err(LoadError::NotAFile(file_kind(&meta)));
        }
        // dlopen searches the library path for a bare name; a relative path
        // with a slash is what the operator means.
        let path: PathBuf = if path.components().count() == 1 {
            Path::new(".").join(path)
        } else {
            path.into()
        };

        // SAFETY: loading a library runs its initialisers. Plugins are
        // trusted code (see the header's trust model).
        let library = unsafe { libloading::Library::new(&path) }.map_err(|e| {
            // glibc says "No such file or directory" for a library built
            // for another machine: name the real cause.
            match elf_machine(&path) {
                Some(file) if file != HOST_MACHINE => LoadError::WrongMachine {
                    file: file.to_owned(),
                    host: HOST_MACHINE,
                },
                // The loader names the file it could not load: another
                // than the plugin is one the plugin links.
                _ if !e.to_string().starts_with(&*path.to_string_lossy()) => {
                    LoadError::Dependency(e)
                }
                _ => LoadError::Open(e),
            }
        })?;
        // SAFETY: the symbol's type is the header's etl_plugin_entry_fn.
        let entry: libloading::Symbol<abi::EtlPluginEntryFn> =
            unsafe { library.get(abi::ENTRY_SYMBOL) }.map_err(LoadError::NoEntry)?;
        // SAFETY: calling the entry is the documented way to get the table.
        let table_ptr = unsafe { entry() };
        if table_ptr.is_null() {
            return Err(LoadError::NullTable);
        }

        // Read the version first: it is the only thing every version agrees on.
        // SAFETY: every ABI version starts with two u16 version fields and a
        // u32 size, and the pointer is non-null and points into the library.
        let (major, minor, size) = unsafe {
            let head = table_ptr.cast::<u16>();
            (
                *head,
                *head.add(1),
                *table_ptr.cast::<u32>().add(1) as usize,
            )
        };
        if major != abi::ABI_VERSION_MAJOR {
            return Err(LoadError::AbiMismatch {
                plugin: (major, minor),
                host: (abi::ABI_VERSION_MAJOR, abi::ABI_VERSION_MINOR),
            });
        }
        if size < TABLE_1_0_SIZE {
            return Err(LoadError::BadTable(format!(
                "struct_size is {size} bytes, smaller than the {TABLE_1_0_SIZE} bytes of ABI 1.0"
            )));
        }
        // Copy the fields the plugin's minor has; later ones stay NULL.
        // SAFETY: an all-zero table is valid (NULL strings and hooks), and
        // the plugin's table is `size` bytes long; same major and at least
        // the 1.0 size, so the 1.0 fields are there. The table is static in
        // the library, which we keep loaded.
        let table: abi::EtlPlugin = unsafe {
            let mut table = std::mem::MaybeUninit::<abi::EtlPlugin>::zeroed();
            let known = size.min(std::mem::size_of::<abi::EtlPlugin>());
            std::ptr::copy_nonoverlapping(
                table_ptr.cast::<u8>(),
                table.as_mut_ptr().cast::<u8>(),
                known,
            );
            table.assume_init()
        };
        let invoke = table
            .invoke
            .ok_or_else(|| LoadError::BadTable("the invoke hook is NULL".into()))?;

        // Run init first: what it describes (ABI 1.1) completes the table.
        let (state, described) = match table.init {
            Some(init) => run_init(init, config)?,
            None => (PluginState(std::ptr::null_mut()), Described::default()),
        };
        let text = |field: &str, s: abi::EtlStr| -> Result<String, LoadError> {
            // SAFETY: the table's strings live as long as the library.
            let bytes = unsafe { s.as_bytes() };
            String::from_utf8(bytes.to_vec()).map_err(|_| {
                LoadError::BadTable(format!("the `{field}` string is not valid UTF-8"))
            })
        };
        let field = |name: &str, described: &Option<String>, s: abi::EtlStr| match described {
            Some(value) => Ok(value.clone()),
            None => text(name, s),
        };
        let name = field("name", &described.name, table.name)?;
        let version = field("version", &described.version, table.version)?;
        let inputs = parse_schema(
            "inputs_schema",
            &field(
                "inputs_schema",
                &described.inputs_schema,
                table.inputs_schema,
            )?,
        )?;
        let outputs = parse_schema(
            "outputs_schema",
            &field(
                "outputs_schema",
                &described.outputs_schema,
                table.outputs_schema,
            )?,
        )?;
        let explicit_id = field("id", &described.id, table.id)?;
        let schema = serde_json::json!({ "inputs": inputs, "outputs": outputs });
        let id = if explicit_id.is_empty() {
            etl_dialect::plugin_id::derive(&schema)
        } else {
            explicit_id
        };
        let flags = table.flags | described.flags;
        let request_schema = match &described.request_schema {
            Some(text) => Some(parse_schema("request_schema", text)?),
            None => None,
        };

        let manifest = Manifest {
            name,
            version,
            abi_major: major,
            abi_minor: minor,
            schema,
            id,
            capabilities: table.capabilities | described.capabilities,
            streaming: flags & abi::FLAG_STREAMING != 0,
            has_precheck: table.precheck.is_some(),
            request_schema,
        };

        Ok(Plugin {
            manifest,
            invoke,
            precheck: table.precheck,
            shutdown: table.shutdown,
            finish: table.finish,
            state,
            _library: library,
        })
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Calls `invoke` on this thread with `request` (a JSON object) and
    /// returns its result code. Blocking: call it from a blocking thread.
    pub fn invoke(&self, invocation: &Invocation, request: &[u8]) -> i32 {
        // SAFETY: ctx and request are valid until the call returns; the hook
        // belongs to the library we keep loaded.
        invocation.call(self.state, |ctx| unsafe {
            (self.invoke)(ctx, abi::EtlStr::from_bytes(request))
        })
    }

    /// Calls `precheck`, or answers OK when the plugin has none.
    pub fn precheck(&self, invocation: &Invocation) -> i32 {
        let Some(precheck) = self.precheck else {
            return abi::RESULT_OK;
        };
        // SAFETY: as in invoke.
        invocation.call(self.state, |ctx| unsafe { precheck(ctx) })
    }

    /// Calls the plugin's `finish` hook with its state, or else its
    /// `shutdown` hook. Only call it once no invocation is inside the
    /// plugin.
    pub fn shutdown(&self) {
        // SAFETY: the hooks belong to the library we keep loaded; the state
        // is the one init stored.
        match (self.finish, self.shutdown) {
            (Some(finish), _) => unsafe { finish(self.state.0) },
            (None, Some(shutdown)) => unsafe { shutdown() },
            (None, None) => {}
        }
    }
}

fn parse_schema(field: &str, text: &str) -> Result<Value, LoadError> {
    let value: Value = serde_json::from_str(text)
        .map_err(|e| LoadError::BadSchema(format!("`{field}` is not JSON: {e}")))?;
    if !value.is_object() {
        return Err(LoadError::BadSchema(format!(
            "`{field}` is not a JSON object"
        )));
    }
    if let Err(e) = etl_dialect::validate::check_schema(&value) {
        return Err(LoadError::BadSchema(format!(
            "`{field}` is not a valid JSON Schema: {e}"
        )));
    }
    Ok(value)
}

/// What `init` said through `describe` (ABI 1.1), copied.
#[derive(Default)]
struct Described {
    name: Option<String>,
    version: Option<String>,
    inputs_schema: Option<String>,
    outputs_schema: Option<String>,
    id: Option<String>,
    capabilities: u32,
    flags: u32,
    request_schema: Option<String>,
}

/// What `init`'s callbacks write to, through `host_data`.
#[derive(Default)]
struct InitReport {
    error: Option<String>,
    described: Described,
    /// Why what `describe` was given cannot be used.
    bad_description: Option<String>,
}

/// Runs `init` and returns the state it stored and what it described.
fn run_init(
    init: unsafe extern "C" fn(*const abi::EtlInitCtx) -> i32,
    config: &str,
) -> Result<(PluginState, Described), LoadError> {
    unsafe extern "C" fn set_error(host_data: *mut c_void, message: abi::EtlStr) {
        // SAFETY: host_data is the &mut InitReport below, alive during
        // init; the message is borrowed for this call.
        let report = unsafe { &mut *host_data.cast::<InitReport>() };
        report.error = Some(String::from_utf8_lossy(unsafe { message.as_bytes() }).into_owned());
    }
    unsafe extern "C" fn describe(host_data: *mut c_void, d: *const abi::EtlDescription) {
        // SAFETY: as in set_error; `d` is NULL or readable for this call.
        let report = unsafe { &mut *host_data.cast::<InitReport>() };
        let Some(d) = (unsafe { d.as_ref() }) else {
            return;
        };
        match described(d) {
            Ok(described) => report.described = described,
            Err(why) => report.bad_description = Some(why),
        }
    }
    let mut report = InitReport::default();
    let mut state: *mut c_void = std::ptr::null_mut();
    let ctx = abi::EtlInitCtx {
        struct_size: std::mem::size_of::<abi::EtlInitCtx>() as u32,
        config: abi::EtlStr::from_str(config),
        process_cancel_flag: invocation::process_cancel_flag(),
        host_data: (&mut report as *mut InitReport).cast(),
        set_error,
        host: &invocation::HOST_API,
        state: &mut state,
        describe,
    };
    // SAFETY: ctx and everything it points to live until init returns.
    let rc = unsafe { init(&ctx) };
    if rc != 0 {
        return Err(LoadError::Init(report.error.unwrap_or_else(|| {
            format!("init returned {rc} without a message")
        })));
    }
    match report.bad_description {
        None => Ok((PluginState(state), report.described)),
        Some(why) => Err(LoadError::BadTable(format!(
            "init described it wrongly: {why}"
        ))),
    }
}

/// Copies what a plugin passed to `describe`, or says what is wrong with it.
fn described(d: &abi::EtlDescription) -> Result<Described, String> {
    // The fields after `flags` were added later: read when covered.
    let first_size = std::mem::offset_of!(abi::EtlDescription, request_schema);
    let covers = |offset: usize| d.struct_size as usize > offset;
    if (d.struct_size as usize) < first_size {
        return Err(format!(
            "struct_size is {} bytes, smaller than etl_description's first {first_size}",
            d.struct_size,
        ));
    }
    let text = |field: &str, s: abi::EtlStr| -> Result<Option<String>, String> {
        if s.ptr.is_null() {
            return Ok(None);
        }
        // SAFETY: borrowed for the call to describe, which this runs in.
        let bytes = unsafe { s.as_bytes() };
        String::from_utf8(bytes.to_vec())
            .map(Some)
            .map_err(|_| format!("the `{field}` string is not valid UTF-8"))
    };
    Ok(Described {
        name: text("name", d.name)?,
        version: text("version", d.version)?,
        inputs_schema: text("inputs_schema", d.inputs_schema)?,
        outputs_schema: text("outputs_schema", d.outputs_schema)?,
        id: text("id", d.id)?,
        capabilities: d.capabilities,
        flags: d.flags,
        request_schema: if covers(std::mem::offset_of!(abi::EtlDescription, request_schema)) {
            text("request_schema", d.request_schema)?
        } else {
            None
        },
    })
}
