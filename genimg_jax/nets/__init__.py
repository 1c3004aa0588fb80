"""The networks, one module per network; the family modules (classifier,
gan, vae, diffusion) keep the objectives, train steps and evaluators.

  cnn       CNN: the seed classifier.
  resnet    ResidualBlock, ResNet: the small ResNet classifier, also the
            feature network of the sample-quality metrics.
  dcgan     Generator, Discriminator: the GAN family's DCGAN pair.
  mlp_vae   MLPEncoder, MLPDecoder: the MLP VAE's encoder and decoder.
  conv_vae  ConvEncoder, ConvDecoder, and VAE (encoder + decoder, conv or MLP).
  unet      UNet: the DDPM UNet of the diffusion family.
  dit       DiT: the diffusion family's transformer (DiT; SiT with the flow
            objective), chosen by model.name "dit".
  autoencoder_kl  AutoencoderKL: the Stable Diffusion VAE (diffusers'), for
            latent diffusion; its converter is `genimg_jax.autoencoder`.
  patch_discriminator  NLayerDiscriminator: the PatchGAN discriminator
            (pix2pix's, taming-transformers'), the autoencoder family's
            optional adversarial loss.
  layers    Layers shared by the networks, rewritten for fast CPU steps.

The old locations still work: `classifier.CNN`, `gan.Generator`, `vae.VAE`
etc. are these classes, and `genimg_jax.unet` / `genimg_jax.layers` are
aliases of `genimg_jax.nets.unet` / `genimg_jax.nets.layers`. Class and
submodule names are unchanged, so parameter trees (and checkpoints) are too.
"""
