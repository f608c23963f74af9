//! Configuration: every `AIBRIX_*` variable of DESIGN.md parsed once, up front, from a map (the
//! process environment, or a test's), with every bad value reported together.
//!
//! KV event sync needs the engine's own tokenizer (remote, vLLM's `/tokenize`), so the router's
//! token ids match the engine's. Asked for without it, sync is turned off with one warning that
//! names the missing setting, and the service keeps running on the approximate index.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

/// Every variable kvsync reads, with its default (as documented in the README).
pub const VARIABLES: [(&str, &str); 9] = [
    ("AIBRIX_KV_EVENT_SYNC_ENABLED", "false"),
    ("AIBRIX_USE_REMOTE_TOKENIZER", "false"),
    ("AIBRIX_PREFIX_CACHE_TOKENIZER_TYPE", ""),
    ("AIBRIX_REMOTE_TOKENIZER_ENGINE", "vllm"),
    ("AIBRIX_REMOTE_TOKENIZER_ENDPOINT", ""),
    ("AIBRIX_KV_EVENT_POLL_TIMEOUT_MS", "100"),
    ("AIBRIX_KV_EVENT_REPLAY_TIMEOUT_S", "5"),
    ("AIBRIX_SYNC_MAX_CONTEXTS", "1000"),
    ("AIBRIX_SYNC_MAX_PREFIXES_PER_CONTEXT", "10000"),
];

/// The engine serving `/tokenize`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenizerEngine {
    Vllm,
    Sglang,
}

/// The remote tokenizer: the engine's own `/tokenize`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteTokenizer {
    pub engine: TokenizerEngine,
    /// e.g. `http://vllm-service:8000`.
    pub endpoint: String,
}

/// The parsed configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// KV event sync is on: subscribers, the exact index.
    pub kv_sync: bool,
    pub tokenizer: Option<RemoteTokenizer>,
    pub poll_timeout: Duration,
    pub replay_timeout: Duration,
    pub max_contexts: usize,
    pub max_prefixes_per_context: usize,
}

/// Parsing succeeded; `warnings` say what was turned off and why (log each once).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    pub config: Config,
    pub warnings: Vec<String>,
}

/// Values that cannot be used: every one of them, to report in one message and refuse to start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub problems: Vec<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid configuration ({} problem{}): {}",
            self.problems.len(),
            if self.problems.len() == 1 { "" } else { "s" },
            self.problems.join("; ")
        )
    }
}

impl std::error::Error for ConfigError {}

/// Reads the process environment (only the variables kvsync knows).
pub fn from_process_env() -> Result<Parsed, ConfigError> {
    let vars: BTreeMap<String, String> = VARIABLES
        .iter()
        .filter_map(|(k, _)| std::env::var(k).ok().map(|v| ((*k).to_owned(), v)))
        .collect();
    parse(&vars)
}

struct Reader<'a> {
    vars: &'a BTreeMap<String, String>,
    problems: Vec<String>,
}

impl Reader<'_> {
    /// The trimmed value, or None when unset or empty.
    fn get(&self, key: &str) -> Option<&str> {
        self.vars
            .get(key)
            .map(|v| v.trim())
            .filter(|v| !v.is_empty())
    }

    fn bool(&mut self, key: &str, default: bool) -> bool {
        match self.get(key).map(str::to_ascii_lowercase).as_deref() {
            None => default,
            Some("true" | "1" | "yes" | "on") => true,
            Some("false" | "0" | "no" | "off") => false,
            Some(other) => {
                self.problems
                    .push(format!("{key}={other:?} is not a boolean (true or false)"));
                default
            }
        }
    }

    fn positive(&mut self, key: &str, default: u64) -> u64 {
        match self.get(key) {
            None => default,
            Some(v) => match v.parse::<u64>() {
                Ok(n) if n > 0 => n,
                _ => {
                    self.problems
                        .push(format!("{key}={v:?} is not a positive integer"));
                    default
                }
            },
        }
    }
}

/// Parses the variables; see the module doc for the rules.
pub fn parse(vars: &BTreeMap<String, String>) -> Result<Parsed, ConfigError> {
    let mut r = Reader {
        vars,
        problems: Vec::new(),
    };
    let sync_requested = r.bool("AIBRIX_KV_EVENT_SYNC_ENABLED", false);
    let use_remote = r.bool("AIBRIX_USE_REMOTE_TOKENIZER", false);
    let tokenizer_type = r
        .get("AIBRIX_PREFIX_CACHE_TOKENIZER_TYPE")
        .map(str::to_ascii_lowercase);
    let engine = match r
        .get("AIBRIX_REMOTE_TOKENIZER_ENGINE")
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        None | Some("vllm") => TokenizerEngine::Vllm,
        Some("sglang") => TokenizerEngine::Sglang,
        Some(other) => {
            r.problems.push(format!(
                "AIBRIX_REMOTE_TOKENIZER_ENGINE={other:?} is not a supported engine (vllm or sglang)"
            ));
            TokenizerEngine::Vllm
        }
    };
    let endpoint = r.get("AIBRIX_REMOTE_TOKENIZER_ENDPOINT").map(str::to_owned);
    if let Some(e) = &endpoint {
        let host = e
            .strip_prefix("http://")
            .or_else(|| e.strip_prefix("https://"));
        if host.is_none_or(|h| h.is_empty() || h.starts_with('/')) {
            r.problems.push(format!(
                "AIBRIX_REMOTE_TOKENIZER_ENDPOINT={e:?} is not an http:// URL with a host"
            ));
        } else if e.starts_with("https://") {
            // The client has no TLS connector: refused here rather than failing every text
            // route at run time.
            r.problems.push(format!(
                "AIBRIX_REMOTE_TOKENIZER_ENDPOINT={e:?}: https is not supported (kvsync's \
                 tokenizer client speaks plain HTTP); use an http:// endpoint, e.g. the \
                 engine's in-cluster Service"
            ));
        }
    }
    let poll_ms = r.positive("AIBRIX_KV_EVENT_POLL_TIMEOUT_MS", 100);
    let replay_s = r.positive("AIBRIX_KV_EVENT_REPLAY_TIMEOUT_S", 5);
    let max_contexts = r.positive("AIBRIX_SYNC_MAX_CONTEXTS", 1000);
    let max_prefixes = r.positive("AIBRIX_SYNC_MAX_PREFIXES_PER_CONTEXT", 10_000);
    if !r.problems.is_empty() {
        return Err(ConfigError {
            problems: r.problems,
        });
    }

    let tokenizer = match (use_remote, tokenizer_type.as_deref(), &endpoint) {
        (true, Some("remote"), Some(e)) => Some(RemoteTokenizer {
            engine,
            endpoint: e.clone(),
        }),
        _ => None,
    };
    let mut warnings = Vec::new();
    let mut kv_sync = sync_requested;
    if sync_requested && tokenizer.is_none() {
        let missing = if !use_remote {
            "AIBRIX_USE_REMOTE_TOKENIZER=true".to_owned()
        } else if tokenizer_type.as_deref() != Some("remote") {
            format!(
                "AIBRIX_PREFIX_CACHE_TOKENIZER_TYPE=remote (it is {})",
                tokenizer_type
                    .as_deref()
                    .map_or("unset".to_owned(), |t| format!("{t:?}"))
            )
        } else {
            "AIBRIX_REMOTE_TOKENIZER_ENDPOINT (unset)".to_owned()
        };
        warnings.push(format!(
            "KV event sync is disabled: it needs the remote tokenizer, and {missing} is missing; \
             routing continues on the approximate index"
        ));
        kv_sync = false;
    }
    Ok(Parsed {
        config: Config {
            kv_sync,
            tokenizer,
            poll_timeout: Duration::from_millis(poll_ms),
            replay_timeout: Duration::from_secs(replay_s),
            max_contexts: max_contexts as usize,
            max_prefixes_per_context: max_prefixes as usize,
        },
        warnings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    const FULL: [(&str, &str); 4] = [
        ("AIBRIX_KV_EVENT_SYNC_ENABLED", "true"),
        ("AIBRIX_USE_REMOTE_TOKENIZER", "true"),
        ("AIBRIX_PREFIX_CACHE_TOKENIZER_TYPE", "remote"),
        (
            "AIBRIX_REMOTE_TOKENIZER_ENDPOINT",
            "http://vllm-service:8000",
        ),
    ];

    fn without(key: &str) -> BTreeMap<String, String> {
        let mut v = vars(&FULL);
        v.remove(key);
        v
    }

    #[test]
    fn defaults_leave_sync_off_silently() {
        let p = parse(&BTreeMap::new()).expect("parses");
        assert!(!p.config.kv_sync);
        assert!(p.warnings.is_empty());
        assert_eq!(p.config.poll_timeout, Duration::from_millis(100));
        assert_eq!(p.config.replay_timeout, Duration::from_secs(5));
        assert_eq!(
            (p.config.max_contexts, p.config.max_prefixes_per_context),
            (1000, 10_000)
        );
    }

    #[test]
    fn full_remote_tokenizer_turns_sync_on() {
        let p = parse(&vars(&FULL)).expect("parses");
        assert!(p.config.kv_sync);
        assert!(p.warnings.is_empty());
        assert_eq!(
            p.config.tokenizer,
            Some(RemoteTokenizer {
                engine: TokenizerEngine::Vllm,
                endpoint: "http://vllm-service:8000".into()
            })
        );
    }

    #[test]
    fn each_missing_tokenizer_setting_disables_sync_with_one_warning_naming_it() {
        for (key, named) in [
            (
                "AIBRIX_USE_REMOTE_TOKENIZER",
                "AIBRIX_USE_REMOTE_TOKENIZER=true",
            ),
            (
                "AIBRIX_PREFIX_CACHE_TOKENIZER_TYPE",
                "AIBRIX_PREFIX_CACHE_TOKENIZER_TYPE=remote",
            ),
            (
                "AIBRIX_REMOTE_TOKENIZER_ENDPOINT",
                "AIBRIX_REMOTE_TOKENIZER_ENDPOINT",
            ),
        ] {
            let p = parse(&without(key)).expect("parses");
            assert!(!p.config.kv_sync, "{key}");
            assert_eq!(p.warnings.len(), 1, "{key}");
            assert!(p.warnings[0].contains(named), "{key}: {}", p.warnings[0]);
        }
        let mut v = vars(&FULL);
        v.insert("AIBRIX_USE_REMOTE_TOKENIZER".into(), "false".into());
        let p = parse(&v).expect("parses");
        assert!(!p.config.kv_sync);
        assert!(p.warnings[0].contains("AIBRIX_USE_REMOTE_TOKENIZER=true"));
        let mut v = vars(&FULL);
        v.insert("AIBRIX_PREFIX_CACHE_TOKENIZER_TYPE".into(), "local".into());
        let p = parse(&v).expect("parses");
        assert!(!p.config.kv_sync);
        assert!(p.warnings[0].contains("\"local\""), "{}", p.warnings[0]);
    }

    #[test]
    fn remote_tokenizer_without_sync_is_fine() {
        let mut v = vars(&FULL);
        v.insert("AIBRIX_KV_EVENT_SYNC_ENABLED".into(), "false".into());
        let p = parse(&v).expect("parses");
        assert!(!p.config.kv_sync);
        assert!(p.warnings.is_empty());
        assert!(p.config.tokenizer.is_some());
    }

    #[test]
    fn every_unparsable_value_is_reported_in_one_error() {
        let mut v = vars(&FULL);
        for (k, val) in [
            ("AIBRIX_KV_EVENT_SYNC_ENABLED", "maybe"),
            ("AIBRIX_REMOTE_TOKENIZER_ENGINE", "tgi"),
            ("AIBRIX_REMOTE_TOKENIZER_ENDPOINT", "vllm-service:8000"),
            ("AIBRIX_KV_EVENT_POLL_TIMEOUT_MS", "-5"),
            ("AIBRIX_KV_EVENT_REPLAY_TIMEOUT_S", "0"),
            ("AIBRIX_SYNC_MAX_CONTEXTS", "lots"),
            ("AIBRIX_SYNC_MAX_PREFIXES_PER_CONTEXT", "1e4"),
        ] {
            v.insert(k.into(), val.into());
        }
        let e = parse(&v).expect_err("refused");
        assert_eq!(e.problems.len(), 7, "{e}");
        let msg = e.to_string();
        for k in [
            "AIBRIX_KV_EVENT_SYNC_ENABLED",
            "AIBRIX_REMOTE_TOKENIZER_ENGINE",
            "AIBRIX_REMOTE_TOKENIZER_ENDPOINT",
            "AIBRIX_KV_EVENT_POLL_TIMEOUT_MS",
            "AIBRIX_KV_EVENT_REPLAY_TIMEOUT_S",
            "AIBRIX_SYNC_MAX_CONTEXTS",
            "AIBRIX_SYNC_MAX_PREFIXES_PER_CONTEXT",
        ] {
            assert!(msg.contains(k), "{k} missing from {msg}");
        }
    }

    #[test]
    fn an_https_tokenizer_endpoint_is_refused_with_one_clear_error() {
        let mut v = vars(&FULL);
        v.insert(
            "AIBRIX_REMOTE_TOKENIZER_ENDPOINT".into(),
            "https://vllm-service:8000".into(),
        );
        let e = parse(&v).expect_err("refused at start");
        assert_eq!(e.problems.len(), 1, "{e}");
        assert!(
            e.problems[0].contains("AIBRIX_REMOTE_TOKENIZER_ENDPOINT")
                && e.problems[0].contains("https is not supported"),
            "{e}"
        );
    }

    #[test]
    fn booleans_and_numbers_are_read_leniently_where_unambiguous() {
        let mut v = vars(&FULL);
        v.insert("AIBRIX_KV_EVENT_SYNC_ENABLED".into(), " TRUE ".into());
        v.insert("AIBRIX_USE_REMOTE_TOKENIZER".into(), "1".into());
        v.insert("AIBRIX_KV_EVENT_POLL_TIMEOUT_MS".into(), "250".into());
        v.insert("AIBRIX_REMOTE_TOKENIZER_ENGINE".into(), "SGLang".into());
        let p = parse(&v).expect("parses");
        assert!(p.config.kv_sync);
        assert_eq!(p.config.poll_timeout, Duration::from_millis(250));
        assert_eq!(
            p.config.tokenizer.map(|t| t.engine),
            Some(TokenizerEngine::Sglang)
        );
    }
}
