# /// script
# requires-python = ">=3.10"
# dependencies = ["vlmfit==0.1.0"]
# ///
"""vlmfit run digits: written by `vlmfit launch --hf-jobs`; trains the recipe below and uploads the run
directory to https://huggingface.co/me/vlmfit-runs (also when training stops early)."""

from pathlib import Path

RECIPE = '''\
<RECIPE>
'''


def main():
    recipe = Path("/tmp/recipe.yaml")
    recipe.write_text(RECIPE)
    import subprocess, sys
    code = subprocess.call([sys.executable, '-m', 'vlmfit', 'train', str(recipe)])
    run = Path("/tmp/runs") / 'digits'
    if run.is_dir():
        from huggingface_hub import HfApi

        api = HfApi()  # the token comes from the HF_TOKEN secret
        api.create_repo('me/vlmfit-runs', private=True, exist_ok=True)
        api.upload_folder(repo_id='me/vlmfit-runs', folder_path=str(run), path_in_repo='digits')
        print("run directory uploaded to https://huggingface.co/me/vlmfit-runs/tree/main/digits")
    raise SystemExit(code)


if __name__ == "__main__":
    main()
