//! The value checks every config section shares: names, addresses, ports, weights, durations,
//! sizes, hosts and methods, each turning text into a typed value or an error at its position.

use super::validate::Validator;
use super::*;

impl Validator<'_, '_> {
    pub(super) fn unique_names<'n>(
        &mut self,
        kind: &str,
        names: impl Iterator<Item = &'n Spanned<String>>,
    ) {
        let mut seen = HashSet::new();
        for name in names {
            if name.get_ref().is_empty() {
                self.sink.at(name.span(), format!("{kind} name is empty"));
            } else if !seen.insert(name.get_ref().as_str()) {
                self.sink.at(
                    name.span(),
                    format!("duplicate {kind} name {:?}", name.get_ref()),
                );
            }
        }
    }

    pub(super) fn socket_addr(&mut self, text: &Spanned<String>) -> Option<SocketAddr> {
        match text.get_ref().parse::<SocketAddr>() {
            Ok(addr) => Some(addr),
            Err(_) => {
                self.sink.at(
                    text.span(),
                    format!(
                        "bad address {:?}: expected IP:PORT such as \"127.0.0.1:8080\" or \"[::1]:8080\"",
                        text.get_ref()
                    ),
                );
                None
            }
        }
    }

    /// A backend is `host:port`, `http://host:port` or `https://host[:port]`; a name is resolved
    /// once, when the config is loaded. Returns the address and, for https, the TLS name.
    pub(super) fn backend_addr(
        &mut self,
        text: &Spanned<String>,
    ) -> Option<(SocketAddr, Option<String>)> {
        let raw = text.get_ref();
        let (rest, tls, default_port) = if let Some(rest) = raw.strip_prefix("https://") {
            (rest, true, Some(443))
        } else if let Some(rest) = raw.strip_prefix("http://") {
            (rest, false, Some(80))
        } else {
            (raw.as_str(), false, None)
        };
        let has_port = rest
            .rsplit_once(':')
            .is_some_and(|(_, p)| p.chars().all(|c| c.is_ascii_digit()))
            && !rest.ends_with(']');
        let with_port = match (has_port, default_port) {
            (false, Some(port)) => format!("{rest}:{port}"),
            _ => rest.to_string(),
        };
        let addr = self.socket_or_name(&with_port, text.span())?;
        let tls_name = tls.then(|| {
            let host = with_port
                .rsplit_once(':')
                .map_or(with_port.as_str(), |(h, _)| h);
            host.trim_start_matches('[')
                .trim_end_matches(']')
                .to_string()
        });
        Some((addr, tls_name))
    }

    pub(super) fn socket_or_name(&mut self, value: &str, span: Range<usize>) -> Option<SocketAddr> {
        if let Ok(addr) = value.parse::<SocketAddr>() {
            return self.nonzero_port(addr, span);
        }
        let Some((host, port)) = value.rsplit_once(':') else {
            self.sink.at(
                span.clone(),
                format!(
                    "bad backend address {value:?}: expected HOST:PORT such as \"127.0.0.1:9001\""
                ),
            );
            return None;
        };
        if host.is_empty() || port.parse::<u16>().is_err() {
            self.sink.at(
                span.clone(),
                format!(
                    "bad backend address {value:?}: expected HOST:PORT with a port from 1 to 65535"
                ),
            );
            return None;
        }
        match value.to_socket_addrs().map(|mut addrs| addrs.next()) {
            Ok(Some(addr)) => self.nonzero_port(addr, span.clone()),
            Ok(None) | Err(_) => {
                self.sink.at(
                    span.clone(),
                    format!("cannot resolve backend address {value:?}"),
                );
                None
            }
        }
    }

    pub(super) fn nonzero_port(
        &mut self,
        addr: SocketAddr,
        span: Range<usize>,
    ) -> Option<SocketAddr> {
        if addr.port() == 0 {
            self.sink
                .at(span, format!("backend address {addr} has port 0"));
            return None;
        }
        Some(addr)
    }

    pub(super) fn weight(&mut self, weight: Option<Spanned<i64>>) -> Option<NonZeroU32> {
        let Some(weight) = weight else {
            return NonZeroU32::new(1);
        };
        let value = *weight.get_ref();
        if !(1..=MAX_WEIGHT).contains(&value) {
            self.sink.at(
                weight.span(),
                format!("weight {value} is out of range: use 1 to {MAX_WEIGHT}"),
            );
            return None;
        }
        u32::try_from(value).ok().and_then(NonZeroU32::new)
    }

    pub(super) fn workers(&mut self, workers: Spanned<i64>) -> Option<usize> {
        let value = *workers.get_ref();
        if value == 0 {
            return None;
        }
        if !(1..=MAX_WORKERS).contains(&value) {
            self.sink.at(
                workers.span(),
                format!("workers {value} is out of range: use 0 (one per core) to {MAX_WORKERS}"),
            );
            return None;
        }
        usize::try_from(value).ok()
    }

    pub(super) fn duration(
        &mut self,
        text: Option<Spanned<String>>,
        default: Duration,
    ) -> Duration {
        let Some(text) = text else {
            return default;
        };
        match units::parse_duration(text.get_ref()) {
            Ok(d) if d.is_zero() => {
                self.sink
                    .at(text.span(), "duration must be greater than zero");
                default
            }
            Ok(d) if d > MAX_DURATION => {
                self.sink.at(
                    text.span(),
                    format!("duration {:?} is too long: at most 1h", text.get_ref()),
                );
                default
            }
            Ok(d) => d,
            Err(message) => {
                self.sink.at(text.span(), message);
                default
            }
        }
    }

    pub(super) fn max_body(&mut self, text: Option<Spanned<String>>) -> u64 {
        let Some(text) = text else {
            return DEFAULT_MAX_BODY;
        };
        match units::parse_size(text.get_ref()) {
            Ok(size) if size > MAX_BODY_LIMIT => {
                self.sink.at(
                    text.span(),
                    format!("max_body {:?} is too large: at most 64GiB", text.get_ref()),
                );
                DEFAULT_MAX_BODY
            }
            Ok(size) => size,
            Err(message) => {
                self.sink.at(text.span(), message);
                DEFAULT_MAX_BODY
            }
        }
    }

    pub(super) fn host(&mut self, host: Spanned<String>) -> Option<String> {
        let value = host.get_ref();
        let valid = !value.is_empty()
            && value
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
        if !valid {
            self.sink.at(
                host.span(),
                format!("bad host {value:?}: expected a DNS name such as \"api.example.com\", without port"),
            );
            return None;
        }
        Some(value.to_ascii_lowercase())
    }

    pub(super) fn method(&mut self, method: Spanned<String>) -> Option<Method> {
        let value = method.get_ref();
        let upper = value.to_ascii_uppercase();
        match Method::from_bytes(upper.as_bytes()) {
            Ok(m) if !value.is_empty() => Some(m),
            _ => {
                self.sink.at(method.span(), format!("bad method {value:?}"));
                None
            }
        }
    }
}
