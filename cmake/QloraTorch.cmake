# Finds LibTorch through a Python that can import the pinned torch: $QLORA_PYTHON (the venv made by
# scripts/setup.sh) or else the first python3 on PATH (the GPU machine's, which already has torch).
# Enables CUDA when nvcc is present and that torch is a CUDA build; kernels target sm_90a (Hopper).
if(NOT QLORA_PYTHON)
  if(DEFINED ENV{QLORA_PYTHON})
    set(QLORA_PYTHON $ENV{QLORA_PYTHON})
  else()
    find_program(QLORA_PYTHON NAMES python3 REQUIRED)
  endif()
endif()
set(QLORA_PYTHON ${QLORA_PYTHON} CACHE FILEPATH "Python with torch, transformers, peft (tests use it)")

execute_process(
  COMMAND ${QLORA_PYTHON} -c "import torch;print(torch.utils.cmake_prefix_path);print(torch.__version__);print(torch.version.cuda or '')"
  OUTPUT_VARIABLE _torch_out RESULT_VARIABLE _torch_rc OUTPUT_STRIP_TRAILING_WHITESPACE)
if(NOT _torch_rc EQUAL 0)
  message(FATAL_ERROR "${QLORA_PYTHON} cannot import torch: run scripts/setup.sh (or set QLORA_PYTHON)")
endif()
string(REPLACE "\n" ";" _torch_out "${_torch_out}")
list(GET _torch_out 0 _torch_prefix)
list(GET _torch_out 1 QLORA_TORCH_VERSION)
list(LENGTH _torch_out _n)
set(QLORA_TORCH_CUDA "")
if(_n GREATER 2)
  list(GET _torch_out 2 QLORA_TORCH_CUDA)
endif()
message(STATUS "qlora: torch ${QLORA_TORCH_VERSION} (cuda '${QLORA_TORCH_CUDA}') from ${QLORA_PYTHON}")
list(APPEND CMAKE_PREFIX_PATH ${_torch_prefix})

# CUDA: on when nvcc exists and torch was built with CUDA, unless the user says otherwise.
set(QLORA_CUDA OFF)
if(NOT QLORA_WITH_CUDA STREQUAL "OFF" AND QLORA_TORCH_CUDA)
  # (check_language(CUDA) probes with default architectures that nvcc 13 rejects; look for nvcc.)
  if(NOT CMAKE_CUDA_COMPILER)
    find_program(QLORA_NVCC nvcc HINTS $ENV{CUDA_HOME}/bin /usr/local/cuda/bin)
    if(QLORA_NVCC)
      set(CMAKE_CUDA_COMPILER ${QLORA_NVCC})
    endif()
  endif()
  if(CMAKE_CUDA_COMPILER)
    set(QLORA_CUDA ON)
  elseif(QLORA_WITH_CUDA STREQUAL "ON")
    message(FATAL_ERROR "QLORA_WITH_CUDA=ON but no nvcc was found")
  endif()
endif()
if(QLORA_CUDA)
  # Hopper only: wgmma/setmaxnreg need the arch-specific target (HOPPER.md: use the -gencode form).
  set(CMAKE_CUDA_ARCHITECTURES OFF)
  set(CMAKE_CUDA_STANDARD 17)  # CMake 3.25 knows no CUDA20 flag for nvcc
  set(CMAKE_CUDA_STANDARD_REQUIRED ON)
  enable_language(CUDA)
  set(CMAKE_CUDA_FLAGS "${CMAKE_CUDA_FLAGS} -gencode=arch=compute_90a,code=sm_90a --expt-relaxed-constexpr -lineinfo")
  # Torch's own arch detection finds no GPU here; give it ours so it does not guess.
  set(TORCH_CUDA_ARCH_LIST "9.0a" CACHE STRING "")
endif()
message(STATUS "qlora: CUDA kernels ${QLORA_CUDA}")

find_package(Torch REQUIRED)
# The pip wheel's libtorch_cuda needs the nvidia-* wheels' libraries at link time too.
if(QLORA_TORCH_CUDA)
  execute_process(
    COMMAND ${QLORA_PYTHON} -c "import os,glob,torch;r=os.path.dirname(os.path.dirname(torch.__file__));print(';'.join(sorted(set(os.path.dirname(p) for p in glob.glob(r+'/nvidia/**/lib*/*.so*',recursive=True)))))"
    OUTPUT_VARIABLE _nv_libdirs OUTPUT_STRIP_TRAILING_WHITESPACE)
  foreach(d IN LISTS _nv_libdirs)
    if(d)
      add_link_options("LINKER:-rpath-link,${d}")
    endif()
  endforeach()
endif()
