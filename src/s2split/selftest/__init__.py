"""The upstream selftest's definitions (``tools/testing/selftests/kvm``):
memstress's layout and guest code (:mod:`.memstress`), the guest modes
(:mod:`.modes`), ``dirty_log_perf_test``'s options (:mod:`.options`), its
phases (:mod:`.phases`), backing source names (:mod:`.backing_names`) and
size arguments (:mod:`.sizes`). Nothing here imports numpy."""
