# ONNX Runtime's C/C++ headers for the custom-op library. No PyPI wheel ships them, so unless
# ORT_INCLUDE_DIR (cache variable or environment) names a folder holding onnxruntime_c_api.h, the
# headers are taken from Debian's libonnxruntime-dev package: apt-get downloads it with a private
# configuration (its own sources list, state and cache under the build dir: the system's sources
# and package state are neither used nor changed) and dpkg-deb unpacks it there. Sets ORT_HEADERS to the include folder,
# or to "" with ORT_HEADERS_PROBLEM saying why.

function(actsparse_fetch_ort_headers)
  set(ORT_HEADERS "" PARENT_SCOPE)
  if(NOT ORT_INCLUDE_DIR AND DEFINED ENV{ORT_INCLUDE_DIR})
    set(ORT_INCLUDE_DIR "$ENV{ORT_INCLUDE_DIR}")
  endif()
  if(ORT_INCLUDE_DIR)
    if(EXISTS "${ORT_INCLUDE_DIR}/onnxruntime_c_api.h")
      set(ORT_HEADERS "${ORT_INCLUDE_DIR}" PARENT_SCOPE)
    else()
      set(ORT_HEADERS_PROBLEM "ORT_INCLUDE_DIR=${ORT_INCLUDE_DIR} has no onnxruntime_c_api.h" PARENT_SCOPE)
    endif()
    return()
  endif()

  set(dir "${CMAKE_BINARY_DIR}/ort-headers")
  set(include "${dir}/root/usr/include/onnxruntime")
  if(EXISTS "${include}/onnxruntime_c_api.h")  # fetched by an earlier configure
    set(ORT_HEADERS "${include}" PARENT_SCOPE)
    return()
  endif()
  find_program(APT_GET apt-get)
  find_program(DPKG_DEB dpkg-deb)
  set(keyring /usr/share/keyrings/debian-archive-keyring.gpg)
  if(NOT APT_GET OR NOT DPKG_DEB OR NOT EXISTS "${keyring}")
    set(ORT_HEADERS_PROBLEM
        "no ORT_INCLUDE_DIR given, and apt-get, dpkg-deb or ${keyring} is missing to fetch Debian's libonnxruntime-dev"
        PARENT_SCOPE)
    return()
  endif()

  message(STATUS "actsparse: fetching ONNX Runtime headers (Debian trixie libonnxruntime-dev) into ${dir}")
  file(REMOVE_RECURSE "${dir}")
  file(MAKE_DIRECTORY "${dir}/state/lists/partial" "${dir}/cache/archives/partial")
  file(WRITE "${dir}/state/status" "")
  file(WRITE "${dir}/sources.list"
       "deb [signed-by=${keyring}] http://deb.debian.org/debian trixie main\n")
  set(apt "${APT_GET}" -q -o "Dir::Etc::SourceList=${dir}/sources.list" -o Dir::Etc::SourceParts=/dev/null
      -o "Dir::State=${dir}/state" -o "Dir::State::status=${dir}/state/status" -o "Dir::Cache=${dir}/cache"
      -o Debug::NoLocking=1)
  # TIMEOUT: an unreachable mirror must not stall the build; the library is then skipped.
  execute_process(COMMAND ${apt} update WORKING_DIRECTORY "${dir}" TIMEOUT 300
                  RESULT_VARIABLE rc_update OUTPUT_QUIET ERROR_VARIABLE err_apt)
  if(rc_update EQUAL 0)
    execute_process(COMMAND ${apt} download libonnxruntime-dev WORKING_DIRECTORY "${dir}" TIMEOUT 300
                    RESULT_VARIABLE rc_download OUTPUT_QUIET ERROR_VARIABLE err_apt)
  endif()
  file(GLOB deb "${dir}/libonnxruntime-dev_*.deb")
  if(NOT rc_update EQUAL 0 OR NOT rc_download EQUAL 0 OR NOT deb)
    string(STRIP "${err_apt}" err_apt)
    set(ORT_HEADERS_PROBLEM "could not download Debian's libonnxruntime-dev with apt-get: ${err_apt}" PARENT_SCOPE)
    return()
  endif()
  execute_process(COMMAND "${DPKG_DEB}" -x "${deb}" "${dir}/root" RESULT_VARIABLE rc_unpack ERROR_VARIABLE err_unpack)
  if(NOT rc_unpack EQUAL 0 OR NOT EXISTS "${include}/onnxruntime_c_api.h")
    set(ORT_HEADERS_PROBLEM "could not unpack ${deb}: ${err_unpack}" PARENT_SCOPE)
    return()
  endif()
  set(ORT_HEADERS "${include}" PARENT_SCOPE)
endfunction()
