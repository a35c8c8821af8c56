//! burn module paths of [`super::SegResNet`] to MONAI's state-dict module paths.
//!
//! Ours name MONAI's attributes; what differs is MONAI's `nn.Sequential` indices (`down_layers.i`
//! holds `pre_conv` at index 0, an `nn.Identity` at the finest level, then its ResBlocks;
//! `up_samples.i.0` is the conv; `conv_final` is `[norm, act, conv]`) and MONAI's `Convolution`
//! wrapper, which adds `.conv` to every convolution.

/// PyTorch path for a burn module path (dot-joined, no leaf tensor name). `None` for a path that
/// is not a module of SegResNet, or whose PyTorch counterpart is not one module (`down_layers.i.blocks`
/// is a slice of MONAI's Sequential).
pub(super) fn torch_module_path(burn_path: &str) -> Option<String> {
    let parts: Vec<&str> = if burn_path.is_empty() {
        Vec::new()
    } else {
        burn_path.split('.').collect()
    };
    let mapped = match parts.as_slice() {
        [] => String::new(),
        ["conv_init"] => "convInit.conv".into(),
        ["down_layers"] | ["up_layers"] | ["up_samples"] | ["conv_final"] => parts[0].into(),
        ["down_layers", level, rest @ ..] => {
            let level = index(level)?;
            match rest {
                [] => format!("down_layers.{level}"),
                ["pre_conv"] if level > 0 => format!("down_layers.{level}.0.conv"),
                ["blocks", block, block_rest @ ..] => {
                    // Index 0 of MONAI's Sequential is pre_conv (or nn.Identity).
                    let block = index(block)? + 1;
                    format!("down_layers.{level}.{block}{}", res_block(block_rest)?)
                }
                _ => return None,
            }
        }
        ["up_layers", level] => format!("up_layers.{}", index(level)?),
        ["up_layers", level, block, rest @ ..] => {
            format!("up_layers.{}.{}{}", index(level)?, index(block)?, res_block(rest)?)
        }
        ["up_samples", level] => format!("up_samples.{}", index(level)?),
        ["up_samples", level, "conv"] => format!("up_samples.{}.0.conv", index(level)?),
        ["conv_final", "norm"] => "conv_final.0".into(),
        ["conv_final", "conv"] => "conv_final.2.conv".into(),
        _ => return None,
    };
    Some(mapped)
}

fn index(segment: &str) -> Option<usize> {
    // Plain decimal only: "+1" or "01" are not burn's Vec indices.
    if segment.is_empty()
        || !segment.bytes().all(|b| b.is_ascii_digit())
        || (segment.len() > 1 && segment.starts_with('0'))
    {
        return None;
    }
    segment.parse().ok()
}

/// Suffix inside a ResBlock (with its leading dot).
fn res_block(rest: &[&str]) -> Option<String> {
    Some(match rest {
        [] => String::new(),
        [norm @ ("norm1" | "norm2")] => format!(".{norm}"),
        [conv @ ("conv1" | "conv2")] => format!(".{conv}.conv"),
        _ => return None,
    })
}
