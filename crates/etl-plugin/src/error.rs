//! How a plugin call fails: [`Error`], and the classification a
//! controller can act on ([`PluginError`]).

use std::borrow::Cow;
use std::fmt;

/// Why a plugin call did not succeed.
///
/// Any `std::error::Error` converts into it with `?`; its type name becomes
/// the bracketed class in `status_code_text` (`"[ParseIntError] ..."`), as
/// the reference host does with Python exception classes.
///
/// A failure may also carry the envelope's `failure_category` and
/// `plugin_error` ([`Error::with_category`], [`Error::with_plugin_error`]),
/// which a controller uses to decide whether to retry and whom to tell.
pub struct Error {
    pub(crate) kind: ErrorKind,
}

pub(crate) enum ErrorKind {
    Failed(Box<Failure>),
    Shutdown,
}

/// A failure as the envelope reports it.
pub(crate) struct Failure {
    pub status: u16,
    pub error_type: Cow<'static, str>,
    pub message: String,
    pub category: Option<String>,
    pub plugin_error: Option<PluginError>,
}

impl Failure {
    /// `status_code_text`: `"[ErrorType] message"`.
    pub fn text(&self) -> String {
        format!("[{}] {}", self.error_type, self.message)
    }
}

/// The envelope's `plugin_error`: how a controller should treat a failure.
///
/// The reference host reports a user error (bad configuration, bad input) as
/// `PluginError::user("invalid_input")`, with the `failure_category` as its
/// reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PluginError {
    /// The kind of error, e.g. `"configuration"`. Not empty.
    pub error_type: String,
    /// Why, e.g. `"invalid_input"`. Not empty.
    pub error_reason: String,
    /// The dependency that failed, if one did.
    pub dependency: Option<String>,
    /// Who can act on it.
    pub audience: Option<Audience>,
    /// Whether the same request may succeed if sent again.
    pub retryable: bool,
}

impl PluginError {
    /// A user's error, as the reference host classifies its `UserError`s:
    /// `{"error_type": "configuration", "error_reason": reason,
    /// "dependency": null, "audience": "user", "retryable": false}`.
    pub fn user(reason: impl Into<String>) -> PluginError {
        PluginError {
            error_type: "configuration".into(),
            error_reason: reason.into(),
            dependency: None,
            audience: Some(Audience::User),
            retryable: false,
        }
    }
}

/// Who can act to resolve an error (`plugin_error.audience`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Audience {
    User,
    Platform,
}

impl Error {
    /// A failure with status 500 and the class `PluginError`.
    pub fn new(message: impl Into<String>) -> Error {
        Error::with_status(500, message)
    }

    /// A failure with an HTTP status (100..=599; anything else reads as 500).
    pub fn with_status(status: u16, message: impl Into<String>) -> Error {
        Error {
            kind: ErrorKind::Failed(Box::new(Failure {
                status,
                error_type: Cow::Borrowed("PluginError"),
                message: message.into(),
                category: None,
                plugin_error: None,
            })),
        }
    }

    /// Names the error's class, shown as `[class]` in `status_code_text`.
    #[must_use]
    pub fn with_type(mut self, error_type: impl Into<Cow<'static, str>>) -> Error {
        if let ErrorKind::Failed(f) = &mut self.kind {
            f.error_type = error_type.into();
        }
        self
    }

    /// Sets the envelope's `failure_category`.
    #[must_use]
    pub fn with_category(mut self, category: impl Into<String>) -> Error {
        if let ErrorKind::Failed(f) = &mut self.kind {
            f.category = Some(category.into());
        }
        self
    }

    /// Sets the envelope's `plugin_error`.
    #[must_use]
    pub fn with_plugin_error(mut self, plugin_error: PluginError) -> Error {
        if let ErrorKind::Failed(f) = &mut self.kind {
            f.plugin_error = Some(plugin_error);
        }
        self
    }

    /// The plugin stopped because it was cancelled: the caller gets the
    /// retryable 503 shutdown-abort, not a failure.
    pub fn shutdown() -> Error {
        Error {
            kind: ErrorKind::Shutdown,
        }
    }

    /// Whether this is [`Error::shutdown`].
    pub fn is_shutdown(&self) -> bool {
        matches!(self.kind, ErrorKind::Shutdown)
    }
}

impl<E: std::error::Error> From<E> for Error {
    fn from(e: E) -> Error {
        let full = std::any::type_name::<E>();
        let short = full.rsplit("::").next().unwrap_or(full);
        Error::new(e.to_string()).with_type(short.split('<').next().unwrap_or(short).to_owned())
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            ErrorKind::Failed(failure) => {
                write!(f, "{} (status {})", failure.text(), failure.status)
            }
            ErrorKind::Shutdown => f.write_str("shutdown"),
        }
    }
}
