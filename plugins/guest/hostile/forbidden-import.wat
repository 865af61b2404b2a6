;; A component that asks for a WASI interface (filesystem preopens): the
;; host must refuse to load it, whatever else it exports.
(component
  (import "wasi:filesystem/preopens@0.2.0" (instance))
)
