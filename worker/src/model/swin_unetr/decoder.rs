//! The convolutional half of Swin UNETR: MONAI's `UnetrBasicBlock` (residual variant),
//! `UnetrUpBlock` and `UnetOutBlock`, built from `UnetResBlock`.
//!
//! MONAI wraps every convolution in a `Convolution` sequential whose only child is `conv`, so
//! its state-dict keys read `conv1.conv.weight`; [`Convolution`] and [`TransposedConvolution`]
//! reproduce that nesting to keep burn paths equal to PyTorch's. Convolutions carry no bias
//! (MONAI's `get_conv_layer` default) except the output head's; the norms are InstanceNorm
//! without affine parameters, and the activation is LeakyReLU(0.01).

use burn::module::Module;
use burn::nn::conv::{Conv3d, Conv3dConfig, ConvTranspose3d, ConvTranspose3dConfig};
use burn::nn::{InstanceNorm, InstanceNormConfig, PaddingConfig3d};
use burn::tensor::activation::leaky_relu;
use burn::tensor::{Tensor, backend::Backend};

const NEGATIVE_SLOPE: f64 = 0.01;

/// MONAI's `Convolution` with `conv_only`: a lone `conv` child.
#[derive(Module, Debug)]
pub struct Convolution<B: Backend> {
    pub conv: Conv3d<B>,
}

impl<B: Backend> Convolution<B> {
    /// A cubic convolution with "same" padding, as MONAI's `get_padding` computes for stride 1.
    fn new(channels: [usize; 2], kernel: usize, bias: bool, device: &B::Device) -> Self {
        let pad = (kernel - 1) / 2;
        Self {
            conv: Conv3dConfig::new(channels, [kernel; 3])
                .with_padding(PaddingConfig3d::Explicit(pad, pad, pad))
                .with_bias(bias)
                .init(device),
        }
    }

    fn forward(&self, x: Tensor<B, 5>) -> Tensor<B, 5> {
        self.conv.forward(x)
    }
}

/// MONAI's transposed `Convolution`: a lone `conv` child, kernel = stride = 2, no bias.
#[derive(Module, Debug)]
pub struct TransposedConvolution<B: Backend> {
    pub conv: ConvTranspose3d<B>,
}

/// MONAI's `UnetResBlock`: two 3x3x3 conv + InstanceNorm with LeakyReLU, plus a 1x1x1
/// conv + norm on the residual path when the channel count changes.
#[derive(Module, Debug)]
pub struct UnetResBlock<B: Backend> {
    pub conv1: Convolution<B>,
    pub conv2: Convolution<B>,
    pub norm1: InstanceNorm<B>,
    pub norm2: InstanceNorm<B>,
    pub conv3: Option<Convolution<B>>,
    pub norm3: Option<InstanceNorm<B>>,
}

fn instance_norm<B: Backend>(channels: usize, device: &B::Device) -> InstanceNorm<B> {
    InstanceNormConfig::new(channels).with_affine(false).init(device)
}

impl<B: Backend> UnetResBlock<B> {
    pub fn new(in_channels: usize, out_channels: usize, device: &B::Device) -> Self {
        let projects = in_channels != out_channels;
        Self {
            conv1: Convolution::new([in_channels, out_channels], 3, false, device),
            conv2: Convolution::new([out_channels, out_channels], 3, false, device),
            norm1: instance_norm(out_channels, device),
            norm2: instance_norm(out_channels, device),
            conv3: projects.then(|| Convolution::new([in_channels, out_channels], 1, false, device)),
            norm3: projects.then(|| instance_norm(out_channels, device)),
        }
    }

    pub fn forward(&self, x: Tensor<B, 5>) -> Tensor<B, 5> {
        let out = leaky_relu(self.norm1.forward(self.conv1.forward(x.clone())), NEGATIVE_SLOPE);
        let out = self.norm2.forward(self.conv2.forward(out));
        let residual = match (&self.conv3, &self.norm3) {
            (Some(conv), Some(norm)) => norm.forward(conv.forward(x)),
            _ => x,
        };
        leaky_relu(out + residual, NEGATIVE_SLOPE)
    }
}

/// MONAI's `UnetrBasicBlock` with `res_block=True`: a `UnetResBlock` under `layer`.
#[derive(Module, Debug)]
pub struct UnetrBasicBlock<B: Backend> {
    pub layer: UnetResBlock<B>,
}

impl<B: Backend> UnetrBasicBlock<B> {
    pub fn new(in_channels: usize, out_channels: usize, device: &B::Device) -> Self {
        Self {
            layer: UnetResBlock::new(in_channels, out_channels, device),
        }
    }

    pub fn forward(&self, x: Tensor<B, 5>) -> Tensor<B, 5> {
        self.layer.forward(x)
    }
}

/// MONAI's `UnetrUpBlock` with `res_block=True`: 2x2x2 transposed conv, concatenation with
/// the skip (upsampled first), then a `UnetResBlock` from twice the output channels.
#[derive(Module, Debug)]
pub struct UnetrUpBlock<B: Backend> {
    pub transp_conv: TransposedConvolution<B>,
    pub conv_block: UnetResBlock<B>,
}

impl<B: Backend> UnetrUpBlock<B> {
    pub fn new(in_channels: usize, out_channels: usize, device: &B::Device) -> Self {
        Self {
            transp_conv: TransposedConvolution {
                conv: ConvTranspose3dConfig::new([in_channels, out_channels], [2, 2, 2])
                    .with_stride([2, 2, 2])
                    .with_bias(false)
                    .init(device),
            },
            conv_block: UnetResBlock::new(2 * out_channels, out_channels, device),
        }
    }

    pub fn forward(&self, x: Tensor<B, 5>, skip: Tensor<B, 5>) -> Tensor<B, 5> {
        let up = self.transp_conv.conv.forward(x);
        self.conv_block.forward(Tensor::cat(vec![up, skip], 1))
    }
}

/// MONAI's `UnetOutBlock`: a 1x1x1 convolution with bias.
#[derive(Module, Debug)]
pub struct UnetOutBlock<B: Backend> {
    pub conv: Convolution<B>,
}

impl<B: Backend> UnetOutBlock<B> {
    pub fn new(in_channels: usize, out_channels: usize, device: &B::Device) -> Self {
        Self {
            conv: Convolution::new([in_channels, out_channels], 1, true, device),
        }
    }

    pub fn forward(&self, x: Tensor<B, 5>) -> Tensor<B, 5> {
        self.conv.forward(x)
    }
}
