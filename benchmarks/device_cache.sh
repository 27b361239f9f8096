# Kernel caches across device calls (each call starts on a bare machine). Source it in the call's command:
#   source benchmarks/device_cache.sh && cache_restore   # before: unpack .carry/kernel_cache.tgz.part* into ~
#   ... run ...; cache_save                               # after: $OUT/kernel_cache.tgz.part* (15 MiB pieces)
# Then, here: mkdir -p .carry && cp /work/.device/N/kernel_cache.tgz.part* .carry/ and carry `.carry` next time.
# TRITON_CACHE_AUTOTUNING=1 makes Triton keep each autotuned kernel's best config with the compiled kernels, so
# a warm cache skips both: the 4B training step's first call otherwise spends ~2.5-4 min autotuning fla's
# backward kernels, and the streaming benchmark ~1-2 min on its forward kernels.
export TRITON_CACHE_AUTOTUNING=1
cache_restore() {
  if ls .carry/kernel_cache.tgz.part* >/dev/null 2>&1; then
    cat .carry/kernel_cache.tgz.part* | tar xzf - -C ~ && echo "kernel cache restored: $(du -sh ~/.triton 2>/dev/null | cut -f1)"
  fi
}
cache_save() {
  (cd ~ && tar czf - .triton/cache $(ls -d .tilelang/cache 2>/dev/null)) | split -b 15M - "$OUT/kernel_cache.tgz.part"
  ls -la "$OUT"/kernel_cache.tgz.part*
}
