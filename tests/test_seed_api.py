"""The seed project's README examples, run as written (or with the smallest change, noted), and
meaning the honest thing: retrieval and generation from fMRI only, the seed's pair embedding
flagged as an oracle, and every wrong call naming the right one."""

import pytest
import torch

import miyawaki_dual_encoder as D
import miyawaki_evaluation as E
import miyawaki_generative_backend as G
from helpers import SMALL_ANCHOR_ARGS
from miyawaki_dataset_loader import make_dataloaders, make_simulated_dataset

SIM = ["--data", "simulated", "--device", "cpu"]


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """A dual encoder (the seed's default sizes, 1 epoch) and both decoders (a few steps)."""
    out = tmp_path_factory.mktemp("seed_api")
    D.main([*SIM, "--epochs", "1", "--out-dir", str(out)])
    G.main([*SIM, "--out-dir", str(out), "--diffusion-steps", "3", "--gan-steps", "2",
            "--num-inference-steps", "2", "--n-sample-grids", "0", *SMALL_ANCHOR_ARGS])
    return out


@pytest.mark.xdist_group("seed_api_outputs")   # shares a module fixture: one test process (make test)
def test_loading_the_trained_model_as_the_seed_did(outputs):
    # the seed's lines; only the path gained its folder
    model = D.MiyawakiDualEncoder(fmri_dim=967, latent_dim=512)
    checkpoint = torch.load(outputs / "miyawaki_dual_encoder.pth", weights_only=False)
    model.load_state_dict(checkpoint["model_state_dict"])
    model.eval()
    reloaded, _ = D.MiyawakiDualEncoder.from_checkpoint(outputs / "miyawaki_dual_encoder.pth")
    x = torch.randn(3, 967)
    assert torch.equal(model.encode_fmri(x), reloaded.encode_fmri(x))
    # a differently built model names the call that rebuilds it
    with pytest.raises(RuntimeError, match="from_checkpoint"):
        D.MiyawakiDualEncoder(fmri_dim=967, latent_dim=256).load_state_dict(checkpoint["model_state_dict"])


@pytest.mark.xdist_group("seed_api_outputs")   # shares a module fixture: one test process (make test)
def test_cross_modal_retrieval_as_the_seed_did_is_fmri_only(outputs):
    model, _ = D.MiyawakiDualEncoder.from_checkpoint(outputs / "miyawaki_dual_encoder.pth")
    data = make_simulated_dataset()
    train_loader, test_loader = make_dataloaders(data)              # the loaders the seed assumed
    train_repr = E.extract_latent_representations(model, train_loader)
    test_repr = E.extract_latent_representations(model, test_loader)
    similarity = torch.mm(test_repr["correlation"], train_repr["correlation"].T)
    fold = data.s1()
    assert similarity.shape == (len(fold.test), len(fold.train))
    assert {"fmri", "image", "correlation"} <= set(test_repr)
    # 'correlation' is encode_fmri of the trials' fMRI, whatever images the loader carries
    with torch.no_grad():
        assert torch.allclose(test_repr["correlation"], model.encode_fmri(torch.as_tensor(fold.test.fmri)),
                              atol=1e-6)
    shown = fold.test.images.copy()
    fold.test.images[:] = 1.0 - shown                                # other images, same fMRI
    try:
        swapped = E.extract_latent_representations(model, make_dataloaders(fold)[1])
    finally:
        fold.test.images[:] = shown
    assert torch.equal(swapped["correlation"], test_repr["correlation"])
    assert not torch.equal(swapped["image"], test_repr["image"])


@pytest.mark.xdist_group("seed_api_outputs")   # shares a module fixture: one test process (make test)
def test_generating_stimuli_as_the_seed_did_names_the_honest_calls(outputs):
    model, _ = D.MiyawakiDualEncoder.from_checkpoint(outputs / "miyawaki_dual_encoder.pth")
    checkpoint = torch.load(outputs / G.CHECKPOINT_NAME, weights_only=False)
    decoder = G.MiyawakiDiffusionDecoder(correlation_dim=512)
    with pytest.raises(RuntimeError, match=r"MiyawakiDiffusionDecoder\.from_checkpoint\(path\)"):
        decoder.load_state_dict(checkpoint["diffusion_state_dict"])
    fmri = torch.as_tensor(make_simulated_dataset().s1().test.fmri)
    with torch.no_grad():
        fmri_latent = model.fmri_encoder(fmri)
        stimulus_latent = model.stimulus_encoder(torch.rand(len(fmri), 1, 28, 28))
        with pytest.warns(D.OracleWarning, match="encode_fmri"):
            model.clip_correlation(fmri_latent, stimulus_latent)        # the seed's leaky embedding
        for cls, key in ((G.MiyawakiDiffusionDecoder, "diffusion_state_dict"),
                         (G.MiyawakiGANDecoder, "gan_state_dict")):
            decoder, _ = cls.from_checkpoint(outputs / G.CHECKPOINT_NAME)
            assert all(torch.equal(v, checkpoint[key][k]) for k, v in decoder.state_dict().items())
            correlation_emb = model.encode_fmri(fmri)                   # fMRI only
            with pytest.raises(ValueError, match=r"anchor=decoder\.readout\(fmri\)"):
                decoder(correlation_emb)
            step = decoder.encoding.consistency_step(fmri, decoder.config["likelihood_reg"])
            generated = decoder(correlation_emb, anchor=decoder.readout(fmri),
                                generator=torch.Generator().manual_seed(0), likelihood=step)
            assert generated.shape == (len(fmri), 1, 28, 28)
            assert torch.equal(generated, torch.as_tensor(G.reconstruct(model, decoder, fmri.numpy(),
                                                                        torch.Generator().manual_seed(0))))
