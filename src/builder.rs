//! The options of a [`RegistrationLayer`], set in code (the environment fills in the rest), and
//! the constructors that start from them.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use crate::config::{self, ConfigError, HealthFn, Overrides, Tunables};
use crate::layer::RegistrationLayer;
use crate::lifecycle::Lifecycle;
use crate::protocol::{CheckSpec, HealthReport};

impl RegistrationLayer {
    /// Configuration from the environment (`SERVICEKIT_ORCHESTRATOR_URL`, `SERVICEKIT_HOST`,
    /// `SERVICEKIT_PORT`, `SERVICEKIT_REGISTRATION_KEY`, `SERVICEKIT_DISPLAY_NAME`) and the
    /// defaults. Never fails: a configuration problem is logged when registration would start
    /// (`registration.skipped` when no orchestrator URL is set, `registration.failed`
    /// otherwise), and with `fail_on_error` it stops the server like any other failure.
    pub fn from_env() -> Self {
        Self::builder().build_lenient()
    }

    /// Like [`from_env`](Self::from_env), but a configuration problem is returned.
    pub fn try_from_env() -> Result<Self, ConfigError> {
        Self::builder().build()
    }

    /// Starts a builder with the reference defaults.
    pub fn builder() -> RegistrationLayerBuilder {
        RegistrationLayerBuilder::default()
    }
}

/// Options for a [`RegistrationLayer`]. The orchestrator URL, host, port and registration key
/// fall back to environment variables; every other option has a default.
///
/// ```
/// use std::time::Duration;
/// use servicekit::RegistrationLayer;
///
/// let registration = RegistrationLayer::builder()
///     .orchestrator_url("http://orchestrator:9000")
///     .host("svca")
///     .port(8080)
///     .info(&servicekit::package_info!())
///     .max_attempts(10)
///     .shutdown_timeout(Duration::from_secs(1))
///     .build()?;
/// let config = registration.config().expect("resolved");
/// assert_eq!(config.service_url, "http://svca:8080");
/// assert_eq!(config.orchestrator_url, "http://orchestrator:9000/services/$register");
/// assert_eq!(config.info.display_name, "servicekit");
/// # Ok::<(), servicekit::ConfigError>(())
/// ```
#[derive(Debug, Clone, Default)]
pub struct RegistrationLayerBuilder {
    overrides: Overrides,
    tunables: Tunables,
    fail_on_error: bool,
}

impl RegistrationLayerBuilder {
    /// The orchestrator: its base URL (`http://orchestrator:9000`), to which
    /// `/services/$register` is appended, or the full registration endpoint. Default:
    /// `$SERVICEKIT_ORCHESTRATOR_URL`.
    pub fn orchestrator_url(mut self, url: impl Into<String>) -> Self {
        self.overrides.orchestrator_url = Some(url.into());
        self
    }

    /// The host this service is reached at. Default: `$SERVICEKIT_HOST`, else the hostname.
    pub fn host(mut self, host: impl Into<String>) -> Self {
        self.overrides.host = Some(host.into());
        self
    }

    /// The port this service listens on and advertises. Default: `$SERVICEKIT_PORT`, else
    /// 8000. Serve on [`RegistrationLayer::bind_addr`] to listen where it says.
    pub fn port(mut self, port: u16) -> Self {
        self.overrides.port = Some(port);
        self
    }

    /// Reads the orchestrator URL from this variable instead of `SERVICEKIT_ORCHESTRATOR_URL`.
    pub fn orchestrator_url_env(mut self, name: impl Into<String>) -> Self {
        self.overrides.orchestrator_url_env = name.into();
        self
    }

    /// Reads the host override from this variable instead of `SERVICEKIT_HOST`.
    pub fn host_env(mut self, name: impl Into<String>) -> Self {
        self.overrides.host_env = name.into();
        self
    }

    /// Reads the port from this variable instead of `SERVICEKIT_PORT`.
    pub fn port_env(mut self, name: impl Into<String>) -> Self {
        self.overrides.port_env = name.into();
        self
    }

    /// Key sent as `X-Service-Key`. Default: `$SERVICEKIT_REGISTRATION_KEY`. Never logged.
    pub fn registration_key(mut self, key: impl Into<String>) -> Self {
        self.overrides.registration_key = Some(key.into().into());
        self
    }

    /// What the service says about itself: a [`ServiceInfo`](crate::ServiceInfo), or any
    /// `Serialize` struct that flattens one. [`package_info!`](crate::package_info) gives the
    /// application's package name and version. Default: the executable's name.
    /// `$SERVICEKIT_DISPLAY_NAME`, when set, overrides the `display_name` either way.
    pub fn info<T: Serialize>(mut self, info: &T) -> Self {
        self.overrides.info = Some(config::info_from(info));
        self
    }

    /// Registration attempts before giving up (with `fail_on_error`) or falling back to
    /// background retries. Default 5.
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.tunables.max_attempts = attempts;
        self
    }

    /// The reference library's name for [`max_attempts`](Self::max_attempts), which it
    /// always counted attempts, not retries.
    #[deprecated(since = "0.2.0", note = "it counts attempts: use `max_attempts`")]
    pub fn max_retries(self, attempts: u32) -> Self {
        self.max_attempts(attempts)
    }

    /// Base of the exponential backoff between attempts. Default 2 s.
    pub fn retry_delay(mut self, delay: Duration) -> Self {
        self.tunables.retry_delay = delay;
        self
    }

    /// Longest pause between attempts, and the interval of the background retries once
    /// `max_attempts` attempts have failed without `fail_on_error`. Default 30 s.
    pub fn max_retry_delay(mut self, delay: Duration) -> Self {
        self.tunables.max_retry_delay = delay;
        self
    }

    /// Stop the server when registration fails for good: the shutdown hook fires and
    /// [`RegistrationLayer::error`] says why. Default false: keep serving and keep retrying in
    /// the background.
    pub fn fail_on_error(mut self, fail: bool) -> Self {
        self.fail_on_error = fail;
        self
    }

    /// Bound of every orchestrator call. Default 10 s.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.tunables.timeout = timeout;
        self
    }

    /// Ping to stay registered. Default true.
    pub fn enable_keepalive(mut self, enable: bool) -> Self {
        self.tunables.enable_keepalive = enable;
        self
    }

    /// Fixed ping interval. Default: a third of the orchestrator's `ttl_seconds`.
    pub fn keepalive_interval(mut self, interval: Duration) -> Self {
        self.tunables.keepalive_interval = Some(interval);
        self
    }

    /// Deregister in the shutdown hook. Default true.
    pub fn auto_deregister(mut self, enable: bool) -> Self {
        self.tunables.auto_deregister = enable;
        self
    }

    /// Path probed with an HTTP/1.1 `GET` on `127.0.0.1:<port>` before registering (2xx =
    /// ready). Default: none, a TCP connection to `127.0.0.1:<port>` suffices (the choice for
    /// gRPC servers). Either way the server must accept connections on loopback.
    pub fn health_path(mut self, path: impl Into<String>) -> Self {
        self.tunables.health_path = Some(path.into());
        self
    }

    /// The service's own health, pushed to the orchestrator: `health` is called before every
    /// keepalive ping and its [`HealthReport`] is the ping's body (`PUT …/$ping`), which sets
    /// the instance's `health` on the record (discovery leaves out `critical` instances by
    /// default). Without it a ping has no body and leaves the health alone, as the reference
    /// client's does.
    ///
    /// One report per ping: a change reaches the orchestrator within one keepalive interval,
    /// or at once after [`RegistrationLayer::report_health_now`]. A call that takes longer
    /// than [`health_timeout`](Self::health_timeout) reports `critical` ("health check timed
    /// out") and never delays the ping beyond that. Not to be confused with
    /// [`health_path`](Self::health_path), the readiness probe before registering.
    ///
    /// ```
    /// use servicekit::protocol::HealthReport;
    /// use servicekit::RegistrationLayer;
    ///
    /// let registration = RegistrationLayer::builder()
    ///     .orchestrator_url("http://orchestrator:9000")
    ///     .report_health(|| async { HealthReport::passing() })
    ///     .build()?;
    /// # Ok::<(), servicekit::ConfigError>(())
    /// ```
    pub fn report_health<F, Fut>(mut self, health: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = HealthReport> + Send + 'static,
    {
        self.tunables.health = Some(HealthFn(Arc::new(move || Box::pin(health()))));
        self
    }

    /// How long one call of the [`report_health`](Self::report_health) function may take;
    /// a slower one reports `critical` ("health check timed out"). Default 2 s, and never
    /// more than half the keepalive interval, so the ping still goes out in time.
    pub fn health_timeout(mut self, timeout: Duration) -> Self {
        self.tunables.health_timeout = timeout;
        self
    }

    /// Asks the orchestrator to check this instance itself (pull): the `check` of the
    /// registration, e.g. `CheckSpec::http("/health").interval(Duration::from_secs(5))`.
    /// Default: from `SERVICEKIT_CHECK_HTTP` (a path such as `/health`), `SERVICEKIT_CHECK_TCP`
    /// (`true`) or `SERVICEKIT_CHECK_GRPC` (a gRPC service name, `*` for the whole server),
    /// with `SERVICEKIT_CHECK_INTERVAL_SECONDS` (default 10; the default timeout follows a
    /// shorter interval down), `SERVICEKIT_CHECK_TIMEOUT_SECONDS` (default 2) and
    /// `SERVICEKIT_CHECK_DEREGISTER_CRITICAL_AFTER_SECONDS` (default: never); none when
    /// none of them is set. A mistake is [`ConfigError::InvalidCheck`].
    pub fn check(mut self, check: CheckSpec) -> Self {
        self.overrides.check = Some(check);
        self
    }

    /// How long to wait for the local server to answer. Default 60 s.
    pub fn startup_timeout(mut self, timeout: Duration) -> Self {
        self.tunables.startup_timeout = timeout;
        self
    }

    /// How long the shutdown hook may spend once the signal came: finishing a registration in
    /// flight and deregistering. Default 2 s. When it runs out (a hung orchestrator), the
    /// server drains anyway and the entry expires one TTL later.
    pub fn shutdown_timeout(mut self, budget: Duration) -> Self {
        self.tunables.shutdown_timeout = budget;
        self
    }

    /// Pause between deregistration and draining, for consumers to notice. Default 0.
    pub fn drain_delay(mut self, delay: Duration) -> Self {
        self.tunables.drain_delay = delay;
        self
    }

    /// Resolves the configuration against the environment.
    pub fn build(self) -> Result<RegistrationLayer, ConfigError> {
        let layer = self.build_lenient();
        match layer.config() {
            Ok(_) => Ok(layer),
            Err(e) => Err(e.clone()),
        }
    }

    /// Builds even when the configuration is wrong; the problem is reported when registration
    /// starts (see [`RegistrationLayer::from_env`]).
    pub fn build_lenient(self) -> RegistrationLayer {
        let env = &config::process_env;
        let config = self
            .overrides
            .resolve(&self.tunables, env, &config::machine_hostname);
        let port = match &config {
            Ok(c) => c.port,
            Err(_) => self
                .overrides
                .port(env)
                .map_or(config::DEFAULT_PORT, |(p, _)| p),
        };
        RegistrationLayer::from_lifecycle(Lifecycle::new(config, port, self.fail_on_error))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_shows_in_no_debug() {
        let builder = RegistrationLayerBuilder::default()
            .orchestrator_url("http://orchestrator:9000")
            .host("svca")
            .registration_key("hunter2-secret");
        assert!(!format!("{builder:?}").contains("hunter2"), "{builder:?}");
        let layer = builder.build().expect("valid");
        let config = layer.config().expect("resolved");
        assert_eq!(
            config.registration_key.as_ref().map(|k| k.expose()),
            Some("hunter2-secret")
        );
        for text in [
            format!("{layer:?}"),
            format!("{config:?}"),
            format!("{layer:#?}"),
        ] {
            assert!(!text.contains("hunter2"), "{text}");
            assert!(text.contains("***"), "{text}");
        }
    }

    #[test]
    fn bind_addr_follows_the_port_even_when_the_rest_is_wrong() {
        let layer = RegistrationLayerBuilder::default()
            .orchestrator_url("ftp://nope")
            .port(4321)
            .build_lenient();
        assert!(layer.config().is_err());
        assert_eq!(layer.bind_addr().port(), 4321);
    }
}
