//! `coordinator model info`: a backbone's size, stage by stage, without running it.

use std::process::ExitCode;

use protocol::classes::NUM_CLASSES;
use protocol::spec::ModelSpec;
use serde_json::json;
use worker::backend::Cpu;
use worker::model::{ModelConfig, StageSummary, param_count};

use crate::cli::output::table;

/// What `info` reports, computed once for the table and the JSON.
pub struct ModelInfo {
    pub input: [usize; 5],
    pub params: usize,
    pub stages: Vec<StageSummary>,
}

/// Builds the backbone on the CPU (burn's default init; the values do not matter here).
pub fn model_info(spec: &ModelSpec, input: [usize; 3]) -> anyhow::Result<ModelInfo> {
    let config = ModelConfig::from_spec(spec, NUM_CLASSES)?;
    let model = config.init::<Cpu>(&Default::default());
    let input = [1, 1, input[0], input[1], input[2]];
    model
        .check_input_shape(input)
        .map_err(|e| anyhow::anyhow!("--input {:?}: {e}", &input[2..]))?;
    Ok(ModelInfo {
        input,
        params: param_count(&model),
        stages: model.stages(input),
    })
}

pub fn info(spec: &ModelSpec, input: [usize; 3], as_json: bool) -> anyhow::Result<ExitCode> {
    let info = model_info(spec, input)?;
    let preset = spec.preset_name().name();
    if as_json {
        println!(
            "{}",
            json!({
                "arch": spec.arch(),
                "preset": preset,
                "model": spec,
                "out_channels": NUM_CLASSES,
                "input": info.input,
                "params": info.params,
                "stages": info.stages,
            })
        );
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<Vec<String>> = info
        .stages
        .iter()
        .map(|s| vec![s.name.clone(), shape(&s.output), thousands(s.params)])
        .collect();
    println!(
        "{} ({preset}), input {}, {NUM_CLASSES} outputs",
        spec.arch(),
        shape(&info.input)
    );
    println!("{}", table(&["STAGE", "OUTPUT", "PARAMS"], &rows));
    println!(
        "total params: {} ({:.2}M, {:.1} MB as f32)",
        thousands(info.params),
        info.params as f64 / 1e6,
        info.params as f64 * 4.0 / 1e6
    );
    Ok(ExitCode::SUCCESS)
}

fn shape(dims: &[usize]) -> String {
    let dims: Vec<String> = dims.iter().map(usize::to_string).collect();
    format!("[{}]", dims.join(", "))
}

fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::spec::Preset;

    /// PyTorch's `sum(p.numel() for p in model.parameters())`: the state dict without its
    /// buffers (BatchNorm's running statistics and batch counter).
    fn torch_parameters(spec: &ModelSpec) -> usize {
        let config = ModelConfig::from_spec(spec, NUM_CLASSES).unwrap();
        let model = config.init::<Cpu>(&Default::default());
        worker::model::interop::torch_state_dict(&model, &config)
            .iter()
            .filter(|(k, _)| {
                !["running_mean", "running_var", "num_batches_tracked"]
                    .iter()
                    .any(|b| k.ends_with(b))
            })
            .map(|(_, d)| d.num_elements())
            .sum()
    }

    #[test]
    fn the_count_is_pytorchs_and_the_input_has_batch_one() {
        for preset in Preset::ALL {
            let spec = ModelSpec::preset("unet", preset).unwrap();
            let info = model_info(&spec, [96, 96, 96]).unwrap();
            assert_eq!(info.params, torch_parameters(&spec), "{preset:?}");
            assert_eq!(info.input, [1, 1, 96, 96, 96]);
            assert!(!info.stages.is_empty());
        }
    }

    #[test]
    fn an_input_the_model_cannot_take_is_refused() {
        let spec = ModelSpec::preset("unet", Preset::Tiny).unwrap();
        let err = model_info(&spec, [96, 96, 95]).err().unwrap().to_string();
        assert!(err.contains("--input"), "{err}");
    }

    #[test]
    fn thousands_are_grouped() {
        assert_eq!(thousands(19_074_425), "19,074,425");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
    }
}
