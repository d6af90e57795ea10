"""Write a Flickr-layout collection (annotations CSV + image folder) as img2dataset tar shards.

    .venv/bin/python tools/make_shards.py data/demo/target/annotations.csv data/demo/target/images data/demo/shards

Each image becomes KEY.jpg, KEY.txt (its first caption) and KEY.json in 00000.tar, 00001.tar, ...
(1,000 images a shard), which `cli.py extract --shards` reads in place.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import data  # noqa: E402
import shards  # noqa: E402

if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    df, _ = data.read_annotations(sys.argv[1])
    for path in shards.write_shards(df, Path(sys.argv[2]), Path(sys.argv[3])):
        print(path)
