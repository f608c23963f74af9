//! Storage tiers and sets of them.

use kv_events::Medium;

/// Where a block lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Tier {
    Gpu = 0,
    /// Host memory ("CPU", SGLang's "CPU_PINNED").
    Cpu = 1,
    /// Local or remote storage ("STORAGE", SGLang's "DISK").
    Disk = 2,
    /// Anything else ("EXTERNAL", unknown names).
    External = 3,
}

impl Tier {
    pub const COUNT: usize = 4;
    pub const ALL: [Tier; Tier::COUNT] = [Tier::Gpu, Tier::Cpu, Tier::Disk, Tier::External];

    pub fn of(m: &Medium) -> Tier {
        match m {
            Medium::Gpu => Tier::Gpu,
            Medium::Cpu | Medium::CpuPinned => Tier::Cpu,
            Medium::Storage | Medium::Disk => Tier::Disk,
            Medium::External | Medium::Other(_) => Tier::External,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Tier::Gpu => "gpu",
            Tier::Cpu => "cpu",
            Tier::Disk => "disk",
            Tier::External => "external",
        }
    }
}

/// A set of tiers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TierMask(u8);

impl TierMask {
    pub fn bits(self) -> u8 {
        self.0
    }

    pub(crate) fn from_bits(b: u8) -> Self {
        TierMask(b)
    }

    pub fn only(t: Tier) -> Self {
        TierMask(1 << t as u8)
    }
    #[must_use]
    pub fn with(self, t: Tier) -> Self {
        TierMask(self.0 | 1 << t as u8)
    }
    #[must_use]
    pub fn without(self, t: Tier) -> Self {
        TierMask(self.0 & !(1 << t as u8))
    }
    #[must_use]
    pub fn intersect(self, o: TierMask) -> Self {
        TierMask(self.0 & o.0)
    }
    pub fn contains(self, t: Tier) -> bool {
        self.0 & (1 << t as u8) != 0
    }
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
    pub fn iter(self) -> impl Iterator<Item = Tier> {
        Tier::ALL.into_iter().filter(move |t| self.contains(*t))
    }
}
