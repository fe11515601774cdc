"""Named recipes for the paper's image sets, as data: official URLs, folder layout, counts/checksums.

A recipe says which archives make up a set, where its images sit after unpacking (``image_dirs``, relative to
the recipe root) and, when published, the MD5 of each archive and the number of images.
``loaders.images.prepare.prepare_recipe`` downloads missing archives (resumable), checks them, unpacks each
once (a ``.unpacked-<archive>`` marker records it), and returns the folders to list. Sets that need a person (licence acceptance, Google Drive
folders, a crawl script) have ``manual`` set: the stage then stops with that text unless the images are
already in place under the root.

What is marked ``None`` below is not published by the set's authors (or we could not confirm it): counts are
checked only where known, and a mismatch is a warning (mirrors and later releases differ), never a failure.
Sources checked: ShareGPT4V docs/Data.md (InternLM-XComposer), the TaskGalaxy Hub card's image_download
note, the ALLaVA-4V and MathV360K Hub repos, the COCO download page.
"""

from __future__ import annotations

from dataclasses import dataclass, field

_HF = "https://huggingface.co/datasets"
_SHAREGPT4V_WEBDATA = "https://drive.google.com/drive/folders/1tCUQ-sq6vdshZVkF0ZeF3K4eztkXJgax"


@dataclass(frozen=True)
class Archive:
    url: str
    md5: str | None = None

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1].split("?", 1)[0]


@dataclass(frozen=True)
class Recipe:
    name: str
    title: str
    archives: tuple[Archive, ...] = ()
    image_dirs: tuple[str, ...] = (".",)  # folders (relative to the root) listed recursively after unpacking
    expected_count: int | None = None
    manual: str | None = None  # set when a person must fetch the files; the text says how
    notes: str = ""
    homepage: str = ""
    extensions: tuple[str, ...] = field(default=(".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp"))


def _webdata(part: str) -> Recipe:
    return Recipe(
        name=part.replace("-", "_"),
        title=f"ShareGPT4V {part}",
        image_dirs=(f"{part}/images",),
        manual=(
            f"ShareGPT4V's '{part}' images are shared only as a Google Drive folder ('WebData', academic use only): "
            f"{_SHAREGPT4V_WEBDATA}. Download and unzip it so that the images sit in <root>/{part}/images/, "
            "then rerun."
        ),
        homepage="https://github.com/InternLM/InternLM-XComposer/tree/main/projects/ShareGPT4V",
    )


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe(
            name="mathv360k",
            title="MathV360K images (Math-LLaVA)",
            archives=(Archive(f"{_HF}/Zhiqiang007/MathV360K/resolve/main/data_images.zip"),),
            notes="~40K images from 24 source sets; 5.84 GB zip; layout inside the zip not published, listed whole",
            homepage=f"{_HF}/Zhiqiang007/MathV360K",
        ),
        Recipe(
            name="allava_laion",
            title="ALLaVA-4V LAION images",
            archives=tuple(
                Archive(f"{_HF}/FreedomIntelligence/ALLaVA-4V/resolve/main/allava_laion/image_chunks/images_{i}.zip")
                for i in range(10)
            ),
            notes="10 zips of ~9.3 GB each; image count not published per chunk",
            homepage=f"{_HF}/FreedomIntelligence/ALLaVA-4V",
        ),
        Recipe(
            name="allava_vflan",
            title="ALLaVA-4V Vision-FLAN images",
            archives=(Archive(f"{_HF}/Vision-Flan/vision-flan_191-task_1k/resolve/main/image_191-task_1k.zip"),),
            notes="ALLaVA's VFLAN part reuses Vision-FLAN's image_191-task_1k images",
            homepage=f"{_HF}/FreedomIntelligence/ALLaVA-4V",
        ),
        Recipe(
            name="vg_100k",
            title="Visual Genome part 1 (VG_100K)",
            archives=(Archive("https://cs.stanford.edu/people/rak248/VG_100K_2/images.zip"),),
            image_dirs=("VG_100K",),
            notes="both parts together hold 108,077 images (Visual Genome 1.2)",
            homepage="https://homes.cs.washington.edu/~ranjay/visualgenome/api.html",
        ),
        Recipe(
            name="vg_100k_2",
            title="Visual Genome part 2 (VG_100K_2)",
            archives=(Archive("https://cs.stanford.edu/people/rak248/VG_100K_2/images2.zip"),),
            image_dirs=("VG_100K_2",),
            notes="both parts together hold 108,077 images (Visual Genome 1.2)",
            homepage="https://homes.cs.washington.edu/~ranjay/visualgenome/api.html",
        ),
        Recipe(
            name="coco_train2017",
            title="COCO train2017",
            archives=(Archive("http://images.cocodataset.org/zips/train2017.zip", md5="cced6f7f71b7629ddf16f17bbcfab6b2"),),
            image_dirs=("train2017",),
            expected_count=118_287,
            homepage="https://cocodataset.org/#download",
        ),
        Recipe(
            name="sam",
            title="SA-1B subset used by ShareGPT4V",
            image_dirs=("images",),
            manual=(
                "SA-1B needs its licence accepted at https://ai.meta.com/datasets/segment-anything-downloads/ "
                "(the download links it gives expire). ShareGPT4V uses sa_000000.tar .. sa_000050.tar: download "
                "those, unpack their .jpg files into <root>/images/, then rerun."
            ),
            homepage="https://ai.meta.com/datasets/segment-anything/",
        ),
        Recipe(
            name="ocr_vqa",
            title="OCR-VQA book covers",
            image_dirs=("images",),
            manual=(
                "OCR-VQA images are crawled by the authors' script (Google Drive folder "
                "https://drive.google.com/drive/folders/1_GYPY5UkUy7HIcR0zq3ZCFgeZN7BAfm_). Run it, save every "
                "file as .jpg in <root>/images/ (as LLaVA/ShareGPT4V do), then rerun."
            ),
            homepage="https://ocr-vqa.github.io/",
        ),
        Recipe(
            name="textvqa",
            title="TextVQA train+val images",
            archives=(Archive("https://dl.fbaipublicfiles.com/textvqa/images/train_val_images.zip"),),
            image_dirs=("train_images",),
            expected_count=25_119,
            notes="21,953 train + 3,166 val images (TextVQA 0.5.1)",
            homepage="https://textvqa.org/dataset/",
        ),
        _webdata("web-celebrity"),
        _webdata("web-landmark"),
        _webdata("wikiart"),
    )
}
