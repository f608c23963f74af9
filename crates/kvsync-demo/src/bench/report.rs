//! A run's summary: latency percentiles, throughput, errors, prefix hit, the busiest pod's
//! share; printed as a table and as one `bench key=value …` line.

use super::client::Record;
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// The figures of one run (one rate of a sweep).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Summary {
    /// Offered rate (requests/s) for an open loop; `None` for a closed loop.
    pub rate: Option<f64>,
    pub requests: usize,
    pub errors: usize,
    pub errors_by_kind: BTreeMap<String, usize>,
    pub ttft_ms: Percentiles,
    pub itl_ms: Percentiles,
    pub e2e_ms: Percentiles,
    pub wall_s: f64,
    pub req_s: f64,
    pub out_tok_s: f64,
    /// Cached prompt tokens over prompt tokens (from the usage the server reported).
    pub hit: f64,
    /// The busiest pod's share of the answered requests (0 when no pod is named).
    pub busiest_share: f64,
    pub pods: usize,
}

/// p50, p90, p99 (nearest rank), 0 when there is no sample.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
}

impl Percentiles {
    pub fn of(mut xs: Vec<f64>) -> Percentiles {
        if xs.is_empty() {
            return Percentiles::default();
        }
        xs.sort_by(f64::total_cmp);
        let q = |p: f64| xs[((p * xs.len() as f64).ceil() as usize).clamp(1, xs.len()) - 1];
        Percentiles {
            p50: q(0.50),
            p90: q(0.90),
            p99: q(0.99),
        }
    }
}

impl Summary {
    pub fn of(records: &[Record], wall_s: f64, rate: Option<f64>) -> Summary {
        let ok: Vec<&Record> = records.iter().filter(|r| r.error.is_none()).collect();
        let mut errors_by_kind = BTreeMap::new();
        for r in records {
            if let Some(e) = &r.error {
                *errors_by_kind.entry(e.clone()).or_insert(0) += 1;
            }
        }
        let ms = 1000.0;
        let ttft = ok
            .iter()
            .filter_map(|r| r.first_token.map(|t| (t - r.sent) * ms))
            .collect();
        let itl = ok
            .iter()
            .flat_map(|r| r.itl.iter().map(|x| x * ms))
            .collect();
        let e2e = ok.iter().map(|r| (r.end - r.sent) * ms).collect();
        let prompt: u64 = ok.iter().map(|r| r.prompt_tokens).sum();
        let cached: u64 = ok.iter().map(|r| r.cached_tokens).sum();
        let out: u64 = ok.iter().map(|r| r.output_tokens).sum();
        let mut by_pod: BTreeMap<&str, usize> = BTreeMap::new();
        for r in &ok {
            if let Some(p) = &r.pod {
                *by_pod.entry(p).or_insert(0) += 1;
            }
        }
        let named: usize = by_pod.values().sum();
        let busiest = by_pod.values().max().copied().unwrap_or(0);
        let wall = wall_s.max(1e-9);
        Summary {
            rate,
            requests: records.len(),
            errors: records.len() - ok.len(),
            errors_by_kind,
            ttft_ms: Percentiles::of(ttft),
            itl_ms: Percentiles::of(itl),
            e2e_ms: Percentiles::of(e2e),
            wall_s,
            req_s: ok.len() as f64 / wall,
            out_tok_s: out as f64 / wall,
            hit: if prompt == 0 {
                0.0
            } else {
                cached as f64 / prompt as f64
            },
            busiest_share: if named == 0 {
                0.0
            } else {
                busiest as f64 / named as f64
            },
            pods: by_pod.len(),
        }
    }

    /// The human-readable summary.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let rate = self
            .rate
            .map_or("closed loop".to_owned(), |r| format!("{r} req/s offered"));
        let _ = writeln!(
            s,
            "{rate}: {} requests, {} errors in {:.1} s",
            self.requests, self.errors, self.wall_s
        );
        for (k, n) in &self.errors_by_kind {
            let _ = writeln!(s, "  error {k}: {n}");
        }
        let p = |x: &Percentiles| format!("p50 {:.1}  p90 {:.1}  p99 {:.1}", x.p50, x.p90, x.p99);
        let _ = writeln!(s, "  TTFT ms         {}", p(&self.ttft_ms));
        let _ = writeln!(s, "  inter-token ms  {}", p(&self.itl_ms));
        let _ = writeln!(s, "  end-to-end ms   {}", p(&self.e2e_ms));
        let _ = writeln!(
            s,
            "  {:.2} req/s, {:.0} output tok/s, prefix hit {:.1} %, busiest pod {:.1} % of {} pods",
            self.req_s,
            self.out_tok_s,
            self.hit * 100.0,
            self.busiest_share * 100.0,
            self.pods
        );
        s
    }

    /// `bench key=value …` (machine-readable, one line).
    pub fn line(&self) -> String {
        let mut s = String::from("bench");
        if let Some(r) = self.rate {
            let _ = write!(s, " rate={r}");
        }
        let _ = write!(
            s,
            " requests={} errors={} hit={:.4} ttft_p50_ms={:.1} ttft_p90_ms={:.1} ttft_p99_ms={:.1} \
             itl_p50_ms={:.2} itl_p99_ms={:.2} e2e_p50_ms={:.1} e2e_p90_ms={:.1} req_s={:.2} \
             out_tok_s={:.1} busiest_share={:.4}",
            self.requests,
            self.errors,
            self.hit,
            self.ttft_ms.p50,
            self.ttft_ms.p90,
            self.ttft_ms.p99,
            self.itl_ms.p50,
            self.itl_ms.p99,
            self.e2e_ms.p50,
            self.e2e_ms.p90,
            self.req_s,
            self.out_tok_s,
            self.busiest_share
        );
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(sent: f64, first: f64, end: f64, pod: &str, prompt: u64, cached: u64) -> Record {
        Record {
            sent,
            first_token: Some(first),
            end,
            pod: Some(pod.into()),
            prompt_tokens: prompt,
            cached_tokens: cached,
            output_tokens: 10,
            itl: vec![0.01, 0.02],
            ..Record::default()
        }
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let p = Percentiles::of((1..=100).map(f64::from).collect());
        assert_eq!((p.p50, p.p90, p.p99), (50.0, 90.0, 99.0));
        assert_eq!(Percentiles::of(vec![]), Percentiles::default());
        assert_eq!(Percentiles::of(vec![3.0]).p99, 3.0);
    }

    #[test]
    fn summary_counts_hits_shares_and_errors() {
        let mut rs = vec![
            rec(0.0, 0.1, 0.5, "a", 100, 50),
            rec(0.0, 0.2, 0.6, "a", 100, 0),
            rec(0.0, 0.3, 0.7, "b", 200, 150),
        ];
        rs.push(Record {
            error: Some("status_503".into()),
            ..Record::default()
        });
        let s = Summary::of(&rs, 2.0, Some(4.0));
        assert_eq!(s.requests, 4);
        assert_eq!(s.errors, 1);
        assert_eq!(s.errors_by_kind["status_503"], 1);
        assert!((s.hit - 0.5).abs() < 1e-12);
        assert!((s.busiest_share - 2.0 / 3.0).abs() < 1e-12);
        assert!((s.ttft_ms.p50 - 200.0).abs() < 1e-9);
        assert!((s.out_tok_s - 15.0).abs() < 1e-9);
        let line = s.line();
        for key in [
            "requests=4",
            "errors=1",
            "hit=0.5000",
            "ttft_p50_ms=",
            "ttft_p90_ms=",
            "ttft_p99_ms=",
            "itl_p50_ms=",
            "out_tok_s=",
            "busiest_share=0.6667",
        ] {
            assert!(line.contains(key), "{key} in {line}");
        }
        assert!(line.starts_with("bench rate=4 "));
    }
}
