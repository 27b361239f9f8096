# Kernel caches across device calls (each call starts on a bare machine). Source it in the call's command:
#   source benchmarks/device_cache.sh && cache_restore   # before: unpack .carry/kernel_cache.tar.xz into ~
#   ... run ...; cache_save                               # after: $OUT/kernel_cache.tar.xz.* (15 MiB pieces)
# Then, here: cp /work/.device/N/kernel_cache.tar.xz.* .carry/ and carry `.carry` next time (xz: about 9 MB for the
# stream and training kernels without the IR files; the carry limit is 64 MiB with the fla wheels).
# TRITON_CACHE_AUTOTUNING=1 makes Triton keep each autotuned kernel's best config with the compiled kernels, so
# a warm cache skips both: the 4B training step's first call otherwise spends ~2.5-4 min autotuning fla's
# backward kernels, and the streaming benchmark ~1-2 min on its forward kernels.
export TRITON_CACHE_AUTOTUNING=1
cache_restore() {
  if ls .carry/kernel_cache.tar.xz* >/dev/null 2>&1; then
    cat .carry/kernel_cache.tar.xz* | tar xJf - -C ~ && echo "kernel cache restored: $(du -sh ~/.triton 2>/dev/null | cut -f1)"
  fi
}
cache_save() {  # compiled binaries and metadata only: Triton loads a cached kernel from its .json + .cubin
  find ~/.triton/cache -type f \( -name "*.llir" -o -name "*.ttir" -o -name "*.ttgir" -o -name "*.ptx" \
    -o -name "*.source" \) -delete 2>/dev/null
  (cd ~ && tar cf - .triton/cache $(ls -d .tilelang/cache 2>/dev/null) | xz -T0 -6 | split -b 15M - "$OUT/kernel_cache.tar.xz.")
  ls -la "$OUT"/kernel_cache.tar.xz.*
}
