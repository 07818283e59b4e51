# rdphealth-script: repair-rdp-certificate v1
# Targeted repair for "the RDP certificate or its private key cannot be used" (events 1057,
# 1058, 36870, 36872; negotiation failure SSL_CERT_NOT_ON_SERVER): resets the MachineKeys
# permissions to the documented defaults (keeping a backup of the old ACLs), deletes the
# self-signed RDP certificate and restarts the services so Windows creates a new one.
# A CA-issued certificate bound through SSLCertificateSHA1Hash is left alone and reported.
$ErrorActionPreference = 'Stop'
try {
    $keys = 'C:\ProgramData\Microsoft\Crypto\RSA\MachineKeys'
    $backup = Join-Path $env:TEMP ("machinekeys-acl-{0:yyyyMMddHHmmss}.txt" -f (Get-Date))
    icacls $keys /save $backup /t /c | Out-Null
    "RDPHEALTH backup acl=`"$backup`""
    takeown /f $keys /a /r /d y | Out-Null
    icacls $keys /t /c /grant 'NT AUTHORITY\System:(F)' | Out-Null
    icacls $keys /t /c /grant 'NT AUTHORITY\NETWORK SERVICE:(R)' | Out-Null
    icacls $keys /t /c /grant 'BUILTIN\Administrators:(F)' | Out-Null
    'RDPHEALTH changed key=MachineKeys acl=reset'

    $rdpTcp = 'HKLM:\SYSTEM\CurrentControlSet\Control\Terminal Server\WinStations\RDP-Tcp'
    $bound = (Get-ItemProperty -Path $rdpTcp -ErrorAction SilentlyContinue).SSLCertificateSHA1Hash
    if ($bound) {
        'RDPHEALTH skipped certificate=custom reason="SSLCertificateSHA1Hash is set: a custom certificate is bound"'
    } else {
        foreach ($cert in Get-ChildItem 'Cert:\LocalMachine\Remote Desktop\') {
            Remove-Item -Path $cert.PSPath
            "RDPHEALTH changed certificate=removed thumbprint=$($cert.Thumbprint) notAfter=$($cert.NotAfter.ToString('o'))"
        }
    }
    Restart-Service -Name SessionEnv -Force
    Restart-Service -Name TermService -Force
    'RDPHEALTH result status=ok restart=recommended'
} catch {
    "RDPHEALTH result status=failed detail=`"$($_.Exception.Message)`""
}
