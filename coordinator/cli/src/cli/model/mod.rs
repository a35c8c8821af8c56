//! `coordinator model`: what a backbone looks like (`info`), and moving weights between PyTorch
//! and voxelfleet (`import` a `.pth` into a model directory a run starts from with
//! `model.init_from`; `export` a run's checkpoint as safetensors under PyTorch's key names).

mod export;
mod import;
mod info;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use protocol::spec::{KNOWN_ARCHS, ModelSpec, Preset};

use super::Remote;

#[derive(clap::Subcommand)]
pub enum ModelCommand {
    /// Print a backbone's parameter count (as PyTorch counts it) and a per-stage table of output
    /// shapes and parameters, like torchinfo, for one input of batch 1.
    Info {
        /// Architecture, as `model.arch` names it: unet, segresnet or swinunetr.
        arch: String,
        #[command(flatten)]
        model: ModelArgs,
        /// Input size D,H,W (default: 96,96,96, SuPreM's training patch).
        #[arg(long, default_value = "96,96,96", value_parser = super::parse_shape)]
        input: [usize; 3],
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Import a PyTorch checkpoint (MONAI's models, SuPreM's released `.pth` files) into a model
    /// directory that a run starts from with `model.init_from = "DIR"`. Every tensor of the model
    /// must be in the file with the right shape; keys the model does not use are listed. DIR must
    /// not exist or be empty; it appears whole or not at all.
    Import {
        /// The `.pth`/`.pt` file written by `torch.save` (weights at the top level or under
        /// `net`, `state_dict` or `model`; `module.`/`backbone.` prefixes are stripped).
        file: PathBuf,
        /// Architecture, as `model.arch` names it: unet, segresnet or swinunetr.
        #[arg(long)]
        arch: String,
        #[command(flatten)]
        model: ModelArgs,
        /// The model directory to write.
        #[arg(long)]
        out: PathBuf,
    },
    /// Export a run's checkpoint (the newest, or the one at STEP) as a safetensors file with
    /// PyTorch's key names, which `safetensors.torch.load_file` + `load_state_dict` load into the
    /// MONAI/SuPreM model of the same architecture.
    Export {
        /// RUN or RUN@STEP, the run id as `coordinator runs` lists it.
        run: String,
        /// The safetensors file to write (through `OUT.partial`, renamed when complete).
        #[arg(long)]
        out: PathBuf,
        /// Replace OUT if it exists (a regular file only); without it an existing OUT is refused.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        remote: Remote,
    },
}

/// Which size of an architecture: a preset, with per-architecture overrides.
#[derive(clap::Args, Clone, Debug)]
pub struct ModelArgs {
    /// Named size: suprem (the paper's) or tiny.
    #[arg(long, default_value = "suprem")]
    pub preset: String,
    /// Another key of the `[model]` table, KEY=VALUE (TOML value), e.g. `--set base_width=16`;
    /// repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
}

impl ModelArgs {
    /// The `[model]` table of `arch` these arguments describe, validated as a run spec's would be.
    pub fn spec(&self, arch: &str) -> anyhow::Result<ModelSpec> {
        if !KNOWN_ARCHS.contains(&arch) {
            bail!("architecture `{arch}`: expected one of {}", KNOWN_ARCHS.join(", "));
        }
        let preset = Preset::parse(&self.preset).with_context(|| {
            let names: Vec<&str> = Preset::ALL.iter().map(|p| p.name()).collect();
            format!("--preset `{}`: expected one of {}", self.preset, names.join(", "))
        })?;
        let mut table = toml::Table::new();
        table.insert("arch".into(), arch.into());
        table.insert("preset".into(), preset.name().into());
        for item in &self.overrides {
            let Some((key, value)) = item.split_once('=') else {
                bail!("--set `{item}`: expected KEY=VALUE");
            };
            let key = key.trim();
            if matches!(key, "arch" | "preset" | "init_from") {
                bail!("--set `{item}`: `{key}` is not an override (use --arch/--preset)");
            }
            // A bare word that is not TOML (`--set name=x`) is taken as a string.
            let value = toml::from_str::<toml::Table>(&format!("v = {value}"))
                .ok()
                .and_then(|mut t| t.remove("v"))
                .unwrap_or_else(|| value.trim().into());
            table.insert(key.to_string(), value);
        }
        let spec: ModelSpec = toml::Value::Table(table)
            .try_into()
            .map_err(|e| anyhow::anyhow!("[model] from --arch/--preset/--set: {e}"))?;
        spec.validate()
            .map_err(|(field, reason)| anyhow::anyhow!("{field}: {reason}"))?;
        Ok(spec)
    }
}

pub async fn run(command: ModelCommand) -> anyhow::Result<ExitCode> {
    match command {
        ModelCommand::Info {
            arch,
            model,
            input,
            json,
        } => {
            let spec = model.spec(&arch)?;
            tokio::task::spawn_blocking(move || info::info(&spec, input, json)).await?
        }
        ModelCommand::Import { file, arch, model, out } => {
            let spec = model.spec(&arch)?;
            tokio::task::spawn_blocking(move || import::import(&file, &spec, &out)).await?
        }
        ModelCommand::Export {
            run,
            out,
            force,
            remote,
        } => export::export(&remote, &run, &out, force).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(arch: &str, preset: &str, sets: &[&str]) -> anyhow::Result<ModelSpec> {
        ModelArgs {
            preset: preset.into(),
            overrides: sets.iter().map(|s| s.to_string()).collect(),
        }
        .spec(arch)
    }

    #[test]
    fn arguments_build_the_spec_table_a_run_would_use() {
        let unet = spec("unet", "tiny", &["depth=2", "base_width = 8"]).unwrap();
        let ModelSpec::Unet(u) = &unet else { panic!("{unet:?}") };
        assert_eq!((u.resolved_base_width(), u.resolved_depth()), (8, 2));
        assert_eq!(u.preset, Preset::Tiny);
        assert_eq!(
            spec("swinunetr", "suprem", &[]).unwrap(),
            ModelSpec::preset("swinunetr", Preset::Suprem).unwrap()
        );
    }

    #[test]
    fn bad_arguments_are_refused_by_name() {
        let err = |a: anyhow::Result<ModelSpec>| a.unwrap_err().to_string();
        assert!(err(spec("vnet", "suprem", &[])).contains("architecture `vnet`"));
        assert!(err(spec("unet", "huge", &[])).contains("--preset `huge`"));
        let e = err(spec("segresnet", "suprem", &["depth=2"]));
        assert!(e.contains("depth"), "{e}");
        let e = err(spec("unet", "suprem", &["depth=0"]));
        assert!(e.contains("model.depth"), "{e}");
        assert!(err(spec("unet", "suprem", &["depth"])).contains("KEY=VALUE"));
        assert!(err(spec("unet", "suprem", &["init_from=/x"])).contains("not an override"));
    }
}
