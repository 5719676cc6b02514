"""Shards, loaders and synthetic videos.

Shard format (written by data_tools/build_shards.py, read by both loaders)
--------------------------------------------------------------------------
A shard set is a directory:

    shard-000000.tar, shard-000001.tar, ...   WebDataset tars
    shard-000000.idx, ...                      DALI index files (wds2idx)
    manifest.parquet                           one row per sample: shard (index; the file is
                                               shard_name(shard)), key, label, frames, fps,
                                               width, height, bytes, source
    labels.json                                {"class name": index, ...} (empty when unlabeled)
    rejects.parquet                            one row per unusable input: source, reason
    dataset.json                               summary: codec, counts, build options

Each sample holds:

    <key>.mp4 | <key>.webm   the encoded video (h264 in mp4, vp9 in webm)
    <key>.nframes            frame count, 4 bytes little-endian int32 (read as raw bytes, parsed on the host)
    <key>.cls                label as ASCII decimal (absent when unlabeled)
    <key>.json               metadata: source path, original fps, size, duration

Batch contract (both loaders, every mode)
-----------------------------------------
    batch["video"]        float32 [B, 3, T, H, W], ImageNet-normalized
    batch["label"]        int64 [B], -1 when the sample has no label
    batch["video_index"]  int64 [B], the sample's manifest row; clips of one video share it
    batch["view"]         int64 [B], view number within the video (train: repeated-sample
                          index; eval: temporal_index * num_crops + spatial_index)

In train mode B = videos_per_gpu * num_sample; in eval mode B = videos x segments x crops,
and a rank's last batches can be short or empty. Loaders expose `steps_per_epoch` (equal
on every rank), `bad_samples` (samples skipped on this rank), `failed` (eval: (key,
reason) of videos that could not be decoded), `set_epoch(epoch, start_step=0)` and
`backend`.
"""
