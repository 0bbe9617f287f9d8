"""`optrush generate` streams the same text as the library call; `optrush chat` answers piped stdin lines."""
import io

import pytest

from optrush.cli.main import main
from optrush.generate.decode import generate_texts


@pytest.fixture
def ckpt(tiny_checkpoint):
    return tiny_checkpoint


def test_generate_streams_the_library_output(ckpt, tmp_path, capsys):
    path, model, tokenizer = ckpt
    expected = generate_texts(model, tokenizer, ["Recipe: Soup\n"], max_new_tokens=12, temperature=0)[0]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Recipe: Soup\\n\n\nRecipe: Pie\\n\n")
    assert main(["generate", str(path), "--prompts-file", str(prompts), "--max-new-tokens", "12",
                 "--temperature", "0", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "--- prompt 1/2\nRecipe: Soup\n" + expected + "\n--- prompt 2/2\nRecipe: Pie\n" in out
    assert main(["generate", str(path), "--prompt", "Recipe: Soup\n", "--max-new-tokens", "6", "--temperature",
                 "0.8", "--top-k", "20", "--top-p", "0.9", "--min-p", "0.01", "--repetition-penalty", "1.2",
                 "--seed", "0", "--stop", "\n\n", "--device", "cpu", "--token-healing"]) == 0
    capsys.readouterr()
    from optrush.generate.contrastive import contrastive_search

    expected = tokenizer.decode(contrastive_search(model, tokenizer.encode("Recipe: Pie\n"), penalty_alpha=0.5, top_k=3,
                                                   max_new_tokens=6, eos_id=tokenizer.eos_token_id),
                                skip_special_tokens=True)
    assert main(["generate", str(path), "--prompt", "Recipe: Pie\n", "--max-new-tokens", "6", "--penalty-alpha",
                 "0.5", "--top-k", "3", "--device", "cpu"]) == 0
    assert capsys.readouterr().out == "Recipe: Pie\n" + expected + "\n"


def test_chat_answers_each_stdin_line(ckpt, monkeypatch, capsys):
    path, _, _ = ckpt
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n\nhow do I make soup?\n"))
    assert main(["chat", str(path), "--max-new-tokens", "5", "--temperature", "0", "--device", "cpu",
                 "--system", "You are a cook."]) == 0
    assert capsys.readouterr().out.count("assistant> ") == 2


def test_chat_forgets_the_oldest_exchanges_past_the_context_and_refuses_a_message_too_long(ckpt, monkeypatch,
                                                                                             capsys):
    """The tiny model holds 256 tokens, 100 of them for each reply: a message longer than the rest is refused and
    the chat goes on; a conversation that outgrows the context forgets its oldest exchanges, the system message
    kept, instead of stopping."""
    path, _, tokenizer = ckpt
    medium = "how do I make a good soup with salt and water and oil " * 2
    lines = ["soup " * 300, *[medium] * 8]
    monkeypatch.setattr("sys.stdin", io.StringIO("".join(line + "\n" for line in lines)))
    assert main(["chat", str(path), "--max-new-tokens", "100", "--temperature", "0", "--device", "cpu",
                 "--system", "You are a cook."]) == 0
    captured = capsys.readouterr()
    assert captured.out.count("assistant> ") == 8
    assert captured.err.count("this message does not fit the model's context (256 tokens, --max-new-tokens 100 of "
                              "them for the reply): send a shorter one") == 1
    assert "the conversation outgrew the model's context of 256 tokens: the oldest" in captured.err


def test_eval_report(ckpt, recipe_corpus, tmp_path, capsys):
    path, model, tokenizer = ckpt
    data = tmp_path / "heldout.jsonl"
    data.write_text("".join(recipe_corpus[0].read_text().splitlines(keepends=True)[:6]))
    out = tmp_path / "report.md"
    assert main(["eval", str(path), "--data", str(data), "--samples", "2", "--max-new-tokens", "8", "--max-length",
                 "128", "--device", "cpu", "--out", str(out)]) == 0
    text = out.read_text()
    assert "| perplexity |" in text and "## Sample 2" in text
    import json
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["examples"] == 6 and 1 < report["perplexity"] < 10 * len(tokenizer)


def test_recipe_metrics():
    from optrush.generate.evaluate import ingredient_name, recipe_metrics

    assert ingredient_name("- 1/4 cup butter") == "butter"
    good = recipe_metrics("Ingredients:\n- 2 eggs\n- 1 cup sugar\n- 1 teaspoon salt\nDirections:\n"
                          "1. Beat the eggs.\n2. Stir in the sugar.")
    assert good["parses"] and good["ingredients"] == 3 and abs(good["ingredient_use"] - 2 / 3) < 1e-9
    assert good["repetition"] == 0.0
    bad = recipe_metrics("stir the pot stir the pot stir the pot stir the pot")
    assert not bad["parses"] and bad["repetition"] > 0.5


def test_adapter_on_base_generates_what_the_merged_export_does(ckpt, tmp_path, capsys):
    import torch

    from optrush.config.schema import PeftConfig
    from optrush.models import load_model
    from optrush.peft import apply_lora, save_adapter, save_merged

    path, _, tokenizer = ckpt
    adapted = apply_lora(load_model(path), PeftConfig(method="dora", r=4, alpha=8))
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3)  # a trained-looking adapter: the output must change
    adapter = save_adapter(adapted, tmp_path / "final" / "adapter", base_model_path=str(path))
    merged = save_merged(adapted, tmp_path / "merged")
    tokenizer.save_pretrained(merged)

    def generate(*where):
        assert main(["generate", *where, "--prompt", "Recipe: Soup\n", "--max-new-tokens", "10", "--temperature",
                     "0", "--device", "cpu"]) == 0
        return capsys.readouterr().out

    expected = generate(str(merged))
    assert expected != generate(str(path))
    assert generate("--adapter", str(adapter)) == expected  # base from adapter_config.json
    assert generate(str(path), "--adapter", str(adapter)) == expected
    assert generate(str(tmp_path / "final"), "--base", str(path)) == expected  # final/ holding only adapter/


def test_sample_during_training(ckpt, debug_overrides):
    import json

    from optrush.config import ConfigError, load_config
    from optrush.generate.evaluate import sample_during_training

    _, model, tokenizer = ckpt
    prompts = ["Recipe: Soup\n", "Recipe: Lemon Pie\n"]
    cfg = load_config(None, [*debug_overrides, "train.sample_every=2", "train.sample_max_new_tokens=8",
                             f"train.sample_prompts={json.dumps(prompts)}"])
    assert cfg.train.sample_prompts == prompts
    model.train()
    assert sample_during_training(model, tokenizer, cfg, step=3) == {}
    logged = sample_during_training(model, tokenizer, cfg, step=4)
    expected = generate_texts(model, tokenizer, prompts, max_new_tokens=8, temperature=0)
    assert [logged["sample_0"], logged["sample_1"]] == expected and model.training
    assert {"sample_repetition", "sample_parses", "sample_ingredient_use"} <= set(logged)
    with pytest.raises(ConfigError, match="train.sample_prompts"):
        load_config(None, [*debug_overrides, "train.sample_every=2"])


def test_a_qlora_adapter_generates_over_its_base_quantized_as_in_training(tokenizer_dir, tmp_path):
    """Loaded over the unquantized base, the adapter ran on other weights than it trained on."""
    import torch

    from optrush.config.schema import PeftConfig
    from optrush.data.tokenizer import load_tokenizer
    from optrush.generate.load import load_for_generation
    from optrush.models.io import build_model, load_model, save_model
    from optrush.models.presets import get_preset
    from optrush.peft import apply_lora, save_adapter

    tok = load_tokenizer(tokenizer_dir)
    save_model(build_model(get_preset("debug", vocab_size=len(tok)), seed=0), tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    trained = load_model(tmp_path / "base", quantize="nf4")
    torch.manual_seed(0)
    apply_lora(trained, PeftConfig(method="lora", r=4, alpha=8, quantize="nf4"))
    with torch.no_grad():  # as if trained: B is zero at the start
        for name, weight in trained.named_parameters():
            if "lora_B" in name:
                weight.normal_(0, 0.05)
    save_adapter(trained, tmp_path / "adapter", base_model_path=tmp_path / "base")
    tokens = torch.tensor([tok("Recipe: Toast", add_special_tokens=False)["input_ids"]])
    loaded, _ = load_for_generation(adapter=tmp_path / "adapter", base=tmp_path / "base")
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens), trained.eval()(tokens), rtol=1e-5, atol=1e-5)
