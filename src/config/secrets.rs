//! Secrets: loaded from exactly one of an environment variable, a file or
//! (discouraged) the config itself, checked to be usable in a header, and
//! never quoted in a message. Files holding secrets are checked for modes
//! wider than owner-only.

use std::path::{Path, PathBuf};

use super::{Files, Problems, resolve};
use std::fmt;

/// A client secret or API key as loaded from config.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret; `None` if it holds bytes no header or form can carry.
    pub fn new(value: String) -> Option<Secret> {
        value
            .bytes()
            .all(|b| (0x21..0x7f).contains(&b))
            .then_some(Secret(value))
    }

    /// The clear value, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

// Wipe the secret from memory when it is no longer needed.
impl Drop for Secret {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.0);
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// The three ways a secret `field` can be given: `field`, `field_env`,
/// `field_file`.
pub(super) struct SecretFields {
    pub inline: Option<String>,
    pub env: Option<String>,
    pub file: Option<PathBuf>,
}

/// The secret `field` of the table at `key`, from whichever one of
/// the ways in `given` is set.
pub(super) fn load_secret(
    p: &mut Problems,
    warnings: &mut Vec<String>,
    key: &str,
    field: &str,
    given: SecretFields,
    files: Files<'_>,
) -> Option<Secret> {
    let SecretFields {
        inline,
        env: env_name,
        file,
    } = given;
    let count = inline.is_some() as u8 + env_name.is_some() as u8 + file.is_some() as u8;
    if count != 1 {
        p.add(
            key,
            format!("set exactly one of {field}_env, {field}_file or {field} (found {count})"),
        );
        return None;
    }
    let value = if let Some(v) = inline {
        warnings.push(format!(
            "{key}.{field} is written inline in the config file; prefer {field}_env or {field}_file"
        ));
        v
    } else if let Some(var) = env_name {
        match files.env.var(&var) {
            Some(v) => v,
            None => {
                p.add(
                    format!("{key}.{field}_env"),
                    format!("environment variable {var} is not set"),
                );
                return None;
            }
        }
    } else {
        let path = resolve(files.base, file.as_deref().unwrap_or(Path::new("")));
        warn_if_exposed(&path, &format!("{key}.{field}_file"), warnings);
        match std::fs::read_to_string(&path) {
            Ok(v) => v.trim_end().to_string(),
            Err(e) => {
                p.add(
                    format!("{key}.{field}_file"),
                    format!("cannot read {}: {}", path.display(), e.kind()),
                );
                return None;
            }
        }
    };
    if value.trim().is_empty() {
        p.add(key, format!("{field} is empty"));
        return None;
    }
    match Secret::new(value) {
        Some(s) => Some(s),
        None => {
            p.add(
                key,
                format!("{field} contains characters not allowed in a token"),
            );
            None
        }
    }
}

/// Secrets at rest: a file holding a secret should be readable by its owner
/// only. A wider mode is a warning, not an error, because common platforms
/// mount secrets 0644 by default (Kubernetes without `defaultMode`); the
/// message says how to fix it.
pub(crate) fn warn_if_exposed(path: &Path, key: &str, warnings: &mut Vec<String>) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = std::fs::metadata(path) {
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                warnings.push(format!(
                    "{key}: {} holds a secret but is readable by group or others (mode {mode:04o}); chmod 600 it (Kubernetes: defaultMode: 0400)",
                    path.display()
                ));
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (path, key, warnings);
    }
}
