//! The `[model]` table of a run spec: which backbone, at which preset, with which overrides.
//!
//! A tagged enum with one struct per architecture, so a field that only means something for one
//! backbone (`depth` for the U-Net, `feature_size` for Swin UNETR) is refused by name on the
//! others instead of being silently ignored. Presets live here, in the crate both sides share, so
//! the coordinator validates patch sizes with the same numbers the worker builds the model from.

use serde::{Deserialize, Serialize};

/// Named sizes of every backbone: `suprem` is the paper's, `tiny` trains on two CPU cores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Preset {
    #[default]
    Suprem,
    Tiny,
}

impl Preset {
    pub const ALL: [Preset; 2] = [Preset::Suprem, Preset::Tiny];

    pub fn name(self) -> &'static str {
        match self {
            Preset::Suprem => "suprem",
            Preset::Tiny => "tiny",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.name() == name)
    }
}

/// `model.arch` selects the variant; every other key belongs to that architecture.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "arch", rename_all = "lowercase")]
pub enum ModelSpec {
    Unet(UnetSpec),
    Segresnet(SegResNetSpec),
    Swinunetr(SwinUnetrSpec),
}

/// The Models Genesis 3D U-Net SuPreM trains (`model/Unet.py` in the SuPreM repository).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnetSpec {
    #[serde(default)]
    pub preset: Preset,
    /// Channels of the first convolution (32 in SuPreM); level `i` ends with `2^(i+1)` times it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_width: Option<u32>,
    /// Resolution levels (4 in SuPreM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub depth: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_from: Option<String>,
}

/// MONAI's `SegResNet` with blocks_down 1,2,2,4 and blocks_up 1,1,1.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SegResNetSpec {
    #[serde(default)]
    pub preset: Preset,
    /// Channels of the first level (16 in SuPreM); a multiple of the 8 GroupNorm groups.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_filters: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_from: Option<String>,
}

/// MONAI's `SwinUNETR` (v1 layout).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SwinUnetrSpec {
    #[serde(default)]
    pub preset: Preset,
    /// Embedding width (48 in SuPreM); a multiple of 12, as MONAI requires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub feature_size: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_from: Option<String>,
}

/// Architectures this build can train, as `model.arch` names them.
pub const KNOWN_ARCHS: [&str; 3] = ["unet", "segresnet", "swinunetr"];

impl ModelSpec {
    /// The default spec of `arch` at `preset`; `None` for an unknown name.
    pub fn preset(arch: &str, preset: Preset) -> Option<Self> {
        Some(match arch {
            "unet" => ModelSpec::Unet(UnetSpec {
                preset,
                ..Default::default()
            }),
            "segresnet" => ModelSpec::Segresnet(SegResNetSpec {
                preset,
                ..Default::default()
            }),
            "swinunetr" => ModelSpec::Swinunetr(SwinUnetrSpec {
                preset,
                ..Default::default()
            }),
            _ => return None,
        })
    }

    pub fn arch(&self) -> &'static str {
        match self {
            ModelSpec::Unet(_) => "unet",
            ModelSpec::Segresnet(_) => "segresnet",
            ModelSpec::Swinunetr(_) => "swinunetr",
        }
    }

    pub fn preset_name(&self) -> Preset {
        match self {
            ModelSpec::Unet(s) => s.preset,
            ModelSpec::Segresnet(s) => s.preset,
            ModelSpec::Swinunetr(s) => s.preset,
        }
    }

    /// A voxelfleet checkpoint (written by `coordinator model import` or by a run) whose weights
    /// the run starts from instead of the seeded init.
    pub fn init_from(&self) -> Option<&str> {
        match self {
            ModelSpec::Unet(s) => s.init_from.as_deref(),
            ModelSpec::Segresnet(s) => s.init_from.as_deref(),
            ModelSpec::Swinunetr(s) => s.init_from.as_deref(),
        }
        .filter(|s| !s.trim().is_empty())
    }

    /// The `init_from` field itself, for the CLI to make a relative local path absolute.
    pub fn init_from_mut(&mut self) -> &mut Option<String> {
        match self {
            ModelSpec::Unet(s) => &mut s.init_from,
            ModelSpec::Segresnet(s) => &mut s.init_from,
            ModelSpec::Swinunetr(s) => &mut s.init_from,
        }
    }

    /// Every spatial side of a training patch (and of an evaluation window) must be a multiple of
    /// this: the product of the backbone's downsampling factors.
    pub fn size_multiple(&self) -> u32 {
        match self {
            ModelSpec::Unet(s) => 1 << (s.resolved_depth().clamp(1, 31) - 1),
            // Three stride-2 convolutions after the first level.
            ModelSpec::Segresnet(_) => 8,
            // Patch embedding (2) and four patch mergings (2 each).
            ModelSpec::Swinunetr(_) => 32,
        }
    }

    /// Checks the overrides; the error names the field as the spec file spells it.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        match self {
            ModelSpec::Unet(s) => {
                let width = s.resolved_base_width();
                if width == 0 || width > 512 {
                    return Err(("model.base_width", format!("must be 1..=512, got {width}")));
                }
                let depth = s.resolved_depth();
                if depth == 0 || depth > 7 {
                    return Err(("model.depth", format!("must be 1..=7, got {depth}")));
                }
            }
            ModelSpec::Segresnet(s) => {
                let filters = s.resolved_init_filters();
                if filters == 0 || filters % 8 != 0 || filters > 256 {
                    return Err((
                        "model.init_filters",
                        format!("must be a multiple of 8 (the GroupNorm groups) in 8..=256, got {filters}"),
                    ));
                }
            }
            ModelSpec::Swinunetr(s) => {
                let features = s.resolved_feature_size();
                if features == 0 || features % 12 != 0 || features > 192 {
                    return Err((
                        "model.feature_size",
                        format!("must be a multiple of 12 in 12..=192, got {features}"),
                    ));
                }
            }
        }
        if let ModelSpec::Unet(UnetSpec { init_from: Some(p), .. })
        | ModelSpec::Segresnet(SegResNetSpec { init_from: Some(p), .. })
        | ModelSpec::Swinunetr(SwinUnetrSpec { init_from: Some(p), .. }) = self
            && p.trim().is_empty()
        {
            return Err(("model.init_from", "must name a checkpoint directory or URL".into()));
        }
        Ok(())
    }
}

impl UnetSpec {
    pub fn resolved_base_width(&self) -> u32 {
        self.base_width.unwrap_or(match self.preset {
            Preset::Suprem => 32,
            Preset::Tiny => 4,
        })
    }

    pub fn resolved_depth(&self) -> u32 {
        self.depth.unwrap_or(4)
    }
}

impl SegResNetSpec {
    pub fn resolved_init_filters(&self) -> u32 {
        self.init_filters.unwrap_or(match self.preset {
            Preset::Suprem => 16,
            Preset::Tiny => 8,
        })
    }
}

impl SwinUnetrSpec {
    pub fn resolved_feature_size(&self) -> u32 {
        self.feature_size.unwrap_or(match self.preset {
            Preset::Suprem => 48,
            Preset::Tiny => 12,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ModelSpec, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    #[test]
    fn arch_selects_the_variant_and_presets_resolve() {
        let unet = parse("arch = 'unet'\npreset = 'tiny'\ndepth = 3").unwrap();
        let ModelSpec::Unet(u) = &unet else { panic!("{unet:?}") };
        assert_eq!((u.resolved_base_width(), u.resolved_depth()), (4, 3));
        assert_eq!(unet.size_multiple(), 4);
        let seg = parse("arch = 'segresnet'").unwrap();
        assert_eq!(seg.preset_name(), Preset::Suprem);
        assert_eq!(seg.size_multiple(), 8);
        let swin = parse("arch = 'swinunetr'\nfeature_size = 24").unwrap();
        let ModelSpec::Swinunetr(s) = &swin else { panic!() };
        assert_eq!(s.resolved_feature_size(), 24);
        assert_eq!(swin.size_multiple(), 32);
        for spec in [unet, seg, swin] {
            let again = parse(&toml::to_string(&spec).unwrap()).unwrap();
            assert_eq!(spec, again);
        }
    }

    #[test]
    fn a_field_of_another_architecture_is_refused_by_name() {
        let err = parse("arch = 'segresnet'\ndepth = 3").unwrap_err();
        assert!(err.contains("depth"), "{err}");
        let err = parse("arch = 'resnet'").unwrap_err();
        assert!(err.contains("resnet") && err.contains("swinunetr"), "{err}");
        let err = parse("arch = 'unet'\npreset = 'huge'").unwrap_err();
        assert!(err.contains("huge"), "{err}");
    }

    #[test]
    fn overrides_are_validated_by_field() {
        for (text, field) in [
            ("arch = 'unet'\ndepth = 0", "model.depth"),
            ("arch = 'unet'\nbase_width = 0", "model.base_width"),
            ("arch = 'segresnet'\ninit_filters = 12", "model.init_filters"),
            ("arch = 'swinunetr'\nfeature_size = 16", "model.feature_size"),
            ("arch = 'swinunetr'\ninit_from = ' '", "model.init_from"),
        ] {
            assert_eq!(parse(text).unwrap().validate().unwrap_err().0, field, "{text}");
        }
        for arch in KNOWN_ARCHS {
            for preset in Preset::ALL {
                ModelSpec::preset(arch, preset).unwrap().validate().unwrap();
            }
        }
    }
}
