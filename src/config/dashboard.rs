//! `[dashboard]`: the operator page at `/dashboard` (docs/dashboard.md) — the type, its
//! defaults and its validation.

use std::fmt;

use serde::Deserialize;

use super::{find_key_line, Config, ConfigError};

/// `[dashboard]`: the operator page at `/dashboard` (docs/dashboard.md).
#[derive(Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DashboardConfig {
    /// Serve the dashboard; without it `/dashboard` answers 404.
    pub enabled: bool,
    /// The operator's credential (at least `DASHBOARD_TOKEN_BYTES_MIN` printable ASCII bytes).
    pub token: String,
    /// Hottest channels and largest presence channels shown per app.
    pub channels_shown_max: usize,
}

/// Shortest dashboard token accepted: 16 bytes, so that guessing it online is hopeless.
pub const DASHBOARD_TOKEN_BYTES_MIN: usize = 16;

impl Default for DashboardConfig {
    fn default() -> Self {
        DashboardConfig { enabled: false, token: String::new(), channels_shown_max: 10 }
    }
}

// Hand-written so that the token never reaches a log line through `{:?}`.
impl fmt::Debug for DashboardConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DashboardConfig")
            .field("enabled", &self.enabled)
            .field("token", &if self.token.is_empty() { "" } else { "<redacted>" })
            .field("channels_shown_max", &self.channels_shown_max)
            .finish()
    }
}

impl Config {
    /// The `[dashboard]` table: an enabled dashboard needs a token worth the name.
    pub(super) fn validate_dashboard(&self, text: &str) -> Result<(), ConfigError> {
        let err = |field: &str, message: String| {
            let key = format!("dashboard.{field}");
            let line = find_key_line(text, &key).or_else(|| find_key_line(text, "dashboard.enabled"));
            Err(ConfigError { key, line, message })
        };
        let dashboard = &self.dashboard;
        if !(1..=1000).contains(&dashboard.channels_shown_max) {
            return err("channels_shown_max", "must be between 1 and 1000".into());
        }
        // A token travels in an `Authorization` header and a form field: visible ASCII only.
        if !dashboard.token.bytes().all(|b| b.is_ascii_graphic()) {
            return err("token", "must be printable ASCII without spaces".into());
        }
        if dashboard.enabled && dashboard.token.len() < DASHBOARD_TOKEN_BYTES_MIN {
            let message =
                format!("an enabled dashboard needs a token of at least {DASHBOARD_TOKEN_BYTES_MIN} characters");
            return err("token", message);
        }
        Ok(())
    }
}
